//! The simulated node: pod and provider network namespaces, veth pairs, kubelet-style cgroups.

use std::fs::File;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context as _, bail};

use crate::cmd::{quiet, run};

/// Prefix of every namespace, interface, cgroup and pin this harness creates.
pub const PREFIX: &str = "ict";
/// Node address pods reach the proxy on (on the host's `lo`).
pub const NODE_V4: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 254);
pub const NODE_V6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0x100, 0xff, 0, 0, 0, 1);
/// The simulated provider's service addresses.
pub const PROVIDER_V4: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 10);
pub const PROVIDER_V6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0x203, 0, 0, 0, 0, 0x10);
/// The provider namespace's end of its link: the host's gateway to the provider addresses.
const PROVIDER_GATEWAY_V4: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 2);
/// A second provider address that is never a target.
pub const OTHER_V4: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 20);
const TEST_PREFIXES_V4: [(&str, u8); 2] = [("198.51.100.0", 24), ("203.0.113.0", 24)];
/// The node addresses live on `lo` under this label (IPv4) so a crashed run's can be found.
const NODE_LABEL: &str = "lo:ict";

/// Removes everything a crashed run left behind: stray daemons, namespaces, interfaces, cgroups, pins.
pub fn cleanup_stale() {
    quiet("pkill", &["-KILL", "-f", "--", "bpffs-dir /sys/fs/bpf/ict-"]);
    // The benchmark's reference nginx: its master (config under the run's directory), then workers
    // orphaned by a killed master (a system nginx's workers have their master as parent).
    quiet("pkill", &["-TERM", "-f", "--", "nginx -c /tmp/ict-"]);
    quiet(
        "pkill",
        &["-KILL", "-P", "1", "-f", "--", "nginx: worker process"],
    );
    if let Ok(list) = run("ip", &["netns", "list"]) {
        for name in list.lines().filter_map(|l| l.split_whitespace().next()) {
            if name.starts_with(&format!("{PREFIX}-")) {
                quiet("ip", &["netns", "del", name]);
                let _ = std::fs::remove_dir_all(format!("/etc/netns/{name}"));
            }
        }
    }
    if let Ok(links) = run("ip", &["-o", "link", "show"]) {
        for name in links
            .lines()
            .filter_map(|l| l.split(':').nth(1))
            .map(|n| n.trim().split('@').next().unwrap_or(""))
        {
            if name.starts_with(PREFIX) {
                quiet("ip", &["link", "del", name]);
            }
        }
    }
    remove_node_addresses();
    if let Ok(root) = interceptor::cgroup::discover_cgroup2_mount() {
        remove_cgroup_tree(&root, &root.join(format!("{PREFIX}.slice")));
    }
    if let Ok(entries) = std::fs::read_dir("/sys/fs/bpf") {
        for entry in entries.flatten() {
            if entry
                .file_name()
                .to_string_lossy()
                .starts_with(&format!("{PREFIX}-"))
            {
                let _ = interceptor::ebpf::unpin_all(&entry.path());
            }
        }
    }
}

fn remove_node_addresses() {
    quiet("ip", &["addr", "del", &format!("{NODE_V4}/32"), "dev", "lo"]);
    quiet(
        "ip",
        &["-6", "addr", "del", &format!("{NODE_V6}/128"), "dev", "lo"],
    );
}

/// Moves every process of the tree to the root cgroup and removes the directories, deepest first.
fn remove_cgroup_tree(root: &Path, dir: &Path) {
    if !dir.is_dir() {
        return;
    }
    if let Ok(entries) = std::fs::read_dir(dir) {
        for entry in entries.flatten() {
            if entry.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                remove_cgroup_tree(root, &entry.path());
            }
        }
    }
    if let Ok(procs) = std::fs::read_to_string(dir.join("cgroup.procs")) {
        for pid in procs.lines() {
            let _ = std::fs::write(root.join("cgroup.procs"), pid);
        }
    }
    let _ = std::fs::remove_dir(dir);
}

/// Fails when a test prefix overlaps a route that is not ours.
fn check_prefixes_free() -> anyhow::Result<()> {
    let routes = run("ip", &["-o", "-4", "route", "show"])?;
    for line in routes.lines() {
        let Some(prefix) = line.split_whitespace().next() else {
            continue;
        };
        if prefix == "default" || line.contains(&format!("dev {PREFIX}")) {
            continue;
        }
        let (addr, len) = prefix.split_once('/').unwrap_or((prefix, "32"));
        let (Ok(addr), Ok(len)) = (addr.parse::<Ipv4Addr>(), len.parse::<u8>()) else {
            continue;
        };
        for (test_addr, test_len) in TEST_PREFIXES_V4 {
            let test_addr: Ipv4Addr = test_addr.parse()?;
            let shorter = len.min(test_len);
            let mask = if shorter == 0 {
                0
            } else {
                u32::MAX << (32 - u32::from(shorter))
            };
            if u32::from(addr) & mask == u32::from(test_addr) & mask {
                bail!(
                    "test prefix {test_addr}/{test_len} overlaps the existing route `{line}`: refusing to run"
                );
            }
        }
    }
    Ok(())
}

/// Restores a sysctl on drop.
struct Sysctl {
    path: &'static str,
    old: String,
}

impl Sysctl {
    fn set(path: &'static str, value: &str) -> anyhow::Result<Self> {
        let old = std::fs::read_to_string(path).with_context(|| format!("reading {path}"))?;
        std::fs::write(path, value).with_context(|| format!("writing {path}"))?;
        Ok(Self { path, old })
    }
}

impl Drop for Sysctl {
    fn drop(&mut self) {
        let _ = std::fs::write(self.path, self.old.trim());
    }
}

/// The simulated node. Dropping it removes everything it created.
pub struct Node {
    pub cgroup_root: PathBuf,
    pub dir: PathBuf,
    _forwarding: Option<Sysctl>,
    pods: Vec<String>,
    providers: Vec<String>,
}

impl Node {
    /// Cleans up leftovers, checks the test prefixes are free and creates the node address.
    pub fn new() -> anyhow::Result<Self> {
        cleanup_stale();
        check_prefixes_free()?;
        let cgroup_root = interceptor::cgroup::discover_cgroup2_mount()?;
        let dir = std::env::temp_dir().join(format!("{PREFIX}-{}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        let mut node = Self {
            cgroup_root,
            dir,
            _forwarding: None,
            pods: Vec::new(),
            providers: Vec::new(),
        };
        run(
            "ip",
            &[
                "addr",
                "add",
                &format!("{NODE_V4}/32"),
                "dev",
                "lo",
                "label",
                NODE_LABEL,
            ],
        )?;
        run(
            "ip",
            &[
                "-6",
                "addr",
                "add",
                &format!("{NODE_V6}/128"),
                "dev",
                "lo",
                "nodad",
            ],
        )?;
        node._forwarding = Some(Sysctl::set("/proc/sys/net/ipv4/ip_forward", "1")?);
        Ok(node)
    }

    /// Creates a pod: netns `ict-<name>`, veth, addresses 198.51.100.(4i+2) and 2001:db8:100:i::2,
    /// a cgroup named as kubelet (systemd driver) and containerd name it, and `/etc/netns/.../hosts`.
    pub fn add_pod(&mut self, name: &str, hosts: &[(&str, IpAddr)]) -> anyhow::Result<Pod> {
        let index = self.pods.len() as u8 + 1;
        let netns = format!("{PREFIX}-{name}");
        let host_if = format!("{PREFIX}p{index}");
        self.pods.push(netns.clone());
        let host_v4 = Ipv4Addr::new(198, 51, 100, 4 * index - 3);
        let pod_v4 = Ipv4Addr::new(198, 51, 100, 4 * index - 2);
        let host_v6 = Ipv6Addr::new(0x2001, 0xdb8, 0x100, u16::from(index), 0, 0, 0, 1);
        let pod_v6 = Ipv6Addr::new(0x2001, 0xdb8, 0x100, u16::from(index), 0, 0, 0, 2);
        wire_netns(&netns, &host_if, (host_v4, 30, pod_v4), (host_v6, 64, pod_v6))?;
        let hosts_dir = PathBuf::from(format!("/etc/netns/{netns}"));
        std::fs::create_dir_all(&hosts_dir)?;
        let mut hosts_text = String::from("127.0.0.1 localhost\n");
        for (host, addr) in hosts {
            hosts_text.push_str(&format!("{addr} {host}\n"));
        }
        std::fs::write(hosts_dir.join("hosts"), hosts_text)?;

        let pod_uid = format!("1f0e2d3c-4b5a-6978-8a9b-0c1d2e3f40{index:02}");
        let container = format!("{:0>64}", format!("c0ffee{index}"));
        let cgroup = self
            .cgroup_root
            .join(format!("{PREFIX}.slice"))
            .join("kubepods.slice")
            .join("kubepods-besteffort.slice")
            .join(format!(
                "kubepods-besteffort-pod{}.slice",
                pod_uid.replace('-', "_")
            ))
            .join(format!("cri-containerd-{container}.scope"));
        std::fs::create_dir_all(&cgroup).with_context(|| format!("creating cgroup {}", cgroup.display()))?;
        Ok(Pod {
            netns,
            cgroup,
            uid: pod_uid,
            container_id: container,
            v4: pod_v4,
            v6: pod_v6,
            cgroup_root: self.cgroup_root.clone(),
        })
    }

    /// Creates the provider namespace `ict-<name>` with service addresses [`PROVIDER_V4`],
    /// [`PROVIDER_V6`] and [`OTHER_V4`] routed from the host.
    pub fn add_provider(&mut self, name: &str) -> anyhow::Result<ProviderNetns> {
        let netns = format!("{PREFIX}-{name}");
        let host_if = format!("{PREFIX}v{}", self.providers.len() + 1);
        self.providers.push(netns.clone());
        let v4 = (Ipv4Addr::new(203, 0, 113, 1), 30, PROVIDER_GATEWAY_V4);
        let v6 = (
            Ipv6Addr::new(0x2001, 0xdb8, 0x203, 1, 0, 0, 0, 1),
            64,
            Ipv6Addr::new(0x2001, 0xdb8, 0x203, 1, 0, 0, 0, 2),
        );
        wire_netns(&netns, &host_if, v4, v6)?;
        let ns = |args: &[&str]| ip_in(&netns, args);
        for addr in [PROVIDER_V4.to_string(), OTHER_V4.to_string()] {
            ns(&["addr", "add", &format!("{addr}/32"), "dev", "lo"])?;
            run(
                "ip",
                &[
                    "route",
                    "add",
                    &format!("{addr}/32"),
                    "via",
                    &PROVIDER_GATEWAY_V4.to_string(),
                ],
            )?;
        }
        ns(&[
            "-6",
            "addr",
            "add",
            &format!("{PROVIDER_V6}/128"),
            "dev",
            "lo",
            "nodad",
        ])?;
        run(
            "ip",
            &[
                "-6",
                "route",
                "add",
                &format!("{PROVIDER_V6}/128"),
                "via",
                "2001:db8:203:1::2",
            ],
        )?;
        Ok(ProviderNetns { netns })
    }

    /// Sets or clears `quickack` on the host's route to [`PROVIDER_V4`]. With it, the host's
    /// connections to the provider acknowledge each data segment as it arrives, in the provider's
    /// transmit path; without it, the kernel delays ACKs and sends them either there or from the
    /// receiving process's reads, depending on the segment sizes it has seen. New connections only.
    pub fn set_provider_quickack(&self, on: bool) -> anyhow::Result<()> {
        run(
            "ip",
            &[
                "route",
                "change",
                &format!("{PROVIDER_V4}/32"),
                "via",
                &PROVIDER_GATEWAY_V4.to_string(),
                "quickack",
                if on { "1" } else { "0" },
            ],
        )?;
        Ok(())
    }

    /// Creates a cgroup for a process of the host namespace (not a pod).
    pub fn host_cgroup(&self, name: &str) -> anyhow::Result<PathBuf> {
        let dir = self
            .cgroup_root
            .join(format!("{PREFIX}.slice"))
            .join(format!("{name}.service"));
        std::fs::create_dir_all(&dir).with_context(|| format!("creating cgroup {}", dir.display()))?;
        Ok(dir)
    }

    /// A command that runs in `cgroup`, in the host namespace.
    pub fn host_command(&self, cgroup: &Path, program: &str, args: &[&str]) -> Command {
        in_cgroup(cgroup, None, program, args)
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        for netns in self.pods.iter().chain(&self.providers) {
            quiet("ip", &["netns", "del", netns]);
            let _ = std::fs::remove_dir_all(format!("/etc/netns/{netns}"));
        }
        remove_node_addresses();
        for addr in [PROVIDER_V4.to_string(), OTHER_V4.to_string()] {
            quiet("ip", &["route", "del", &format!("{addr}/32")]);
        }
        remove_cgroup_tree(
            &self.cgroup_root,
            &self.cgroup_root.join(format!("{PREFIX}.slice")),
        );
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// `ip -n netns args...`.
fn ip_in(netns: &str, args: &[&str]) -> anyhow::Result<String> {
    let mut full = vec!["-n", netns];
    full.extend_from_slice(args);
    run("ip", &full)
}

/// Creates `netns` joined to the host by a veth pair (`host_if` on the host, `eth0` inside), with
/// (host address, prefix length, namespace address) for each family and default routes via the host.
fn wire_netns(
    netns: &str,
    host_if: &str,
    (host_v4, len_v4, ns_v4): (Ipv4Addr, u8, Ipv4Addr),
    (host_v6, len_v6, ns_v6): (Ipv6Addr, u8, Ipv6Addr),
) -> anyhow::Result<()> {
    run("ip", &["netns", "add", netns])?;
    run(
        "ip",
        &[
            "link", "add", host_if, "type", "veth", "peer", "name", "eth0", "netns", netns,
        ],
    )?;
    run(
        "ip",
        &["addr", "add", &format!("{host_v4}/{len_v4}"), "dev", host_if],
    )?;
    run(
        "ip",
        &[
            "-6",
            "addr",
            "add",
            &format!("{host_v6}/{len_v6}"),
            "dev",
            host_if,
            "nodad",
        ],
    )?;
    run("ip", &["link", "set", host_if, "up"])?;
    ip_in(netns, &["link", "set", "lo", "up"])?;
    ip_in(
        netns,
        &["addr", "add", &format!("{ns_v4}/{len_v4}"), "dev", "eth0"],
    )?;
    ip_in(
        netns,
        &[
            "-6",
            "addr",
            "add",
            &format!("{ns_v6}/{len_v6}"),
            "dev",
            "eth0",
            "nodad",
        ],
    )?;
    ip_in(netns, &["link", "set", "eth0", "up"])?;
    ip_in(netns, &["route", "add", "default", "via", &host_v4.to_string()])?;
    ip_in(
        netns,
        &["-6", "route", "add", "default", "via", &host_v6.to_string()],
    )?;
    Ok(())
}

/// A simulated pod.
pub struct Pod {
    pub netns: String,
    pub cgroup: PathBuf,
    /// The pod UID its cgroup name carries (kubelet's systemd driver writes it with underscores).
    pub uid: String,
    /// The containerd container ID of its `cri-containerd-<id>.scope` cgroup.
    pub container_id: String,
    pub v4: Ipv4Addr,
    pub v6: Ipv6Addr,
    cgroup_root: PathBuf,
}

impl Pod {
    /// A command that runs in the pod's cgroup and network namespace (`ip netns exec`, which also
    /// applies `/etc/netns/<netns>/hosts`).
    pub fn command(&self, program: &str, args: &[&str]) -> Command {
        in_cgroup(&self.cgroup, Some(&self.netns), program, args)
    }

    /// The cgroup id the kernel reports for processes of this pod (inode of the directory).
    pub fn cgroup_id(&self) -> anyhow::Result<u64> {
        cgroup_id(&self.cgroup)
    }

    /// The cgroup path relative to the cgroup2 root.
    pub fn cgroup_relative(&self) -> String {
        format!(
            "/{}",
            self.cgroup
                .strip_prefix(&self.cgroup_root)
                .unwrap_or(&self.cgroup)
                .display()
        )
    }
}

/// The inode number of a cgroup directory, which is its cgroup id.
pub fn cgroup_id(dir: &Path) -> anyhow::Result<u64> {
    use std::os::unix::fs::MetadataExt as _;
    Ok(std::fs::metadata(dir)
        .with_context(|| format!("stat {}", dir.display()))?
        .ino())
}

/// `sh -c 'echo $$ > cgroup.procs && exec [ip netns exec NS] program args'`: the process joins the
/// cgroup before it execs, so the program's pid is the one in the cgroup.
fn in_cgroup(cgroup: &Path, netns: Option<&str>, program: &str, args: &[&str]) -> Command {
    let mut command = Command::new("sh");
    command
        .arg("-c")
        .arg("echo $$ > \"$0\" && exec \"$@\"")
        .arg(cgroup.join("cgroup.procs"));
    if let Some(netns) = netns {
        command.args(["ip", "netns", "exec", netns]);
    }
    command.arg(program).args(args);
    command.process_group(0);
    command
}

/// A provider network namespace.
pub struct ProviderNetns {
    pub netns: String,
}

impl ProviderNetns {
    /// Runs `f` on a thread that entered this namespace (sockets created there stay in it).
    pub fn enter<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> anyhow::Result<T> + Send + 'static,
    ) -> anyhow::Result<T> {
        let path = format!("/run/netns/{}", self.netns);
        std::thread::spawn(move || -> anyhow::Result<T> {
            let file = File::open(&path).with_context(|| format!("opening {path}"))?;
            nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET)
                .with_context(|| format!("setns {path}"))?;
            f()
        })
        .join()
        .map_err(|_| anyhow::anyhow!("thread in {} panicked", self.netns))?
    }
}
