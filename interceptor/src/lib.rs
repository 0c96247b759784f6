//! The interceptor daemon: eBPF redirect of AI-provider connections, kernel attribution and the
//! proxy that relays them. `main.rs` is a thin CLI over [`app::build`].
#![deny(unsafe_code)]

pub mod accounting;
pub mod admin;
pub mod app;
pub mod audit;
pub mod cgroup;
pub mod config;
pub mod container;
pub mod digest;
pub mod doctor;
pub mod ebpf;
pub mod escapes;
pub mod genai_metrics;
pub mod identity;
pub mod kubernetes;
pub mod logging;
pub mod metric_labels;
pub mod metrics;
pub mod policy;
pub mod providers;
pub mod proxy;
pub mod quota;
pub mod reload;
pub mod selector;
pub mod signal;
pub mod status;
pub mod sys;
pub mod targets;
pub mod tls;
pub mod watched;
