//! Durable budgets: day and month use is written to `<state dir>/quota-budgets.json` every few
//! seconds when it changed (copied under the counters' lock, written on the blocking pool: the data
//! path never waits for the disk), atomically (temporary file, fsync, rename), and at shutdown. A
//! restart or an upgrade restores it; a hard crash loses at most the usage settled since the last
//! write (one flush interval). Rates (per minute, per hour) are not kept: they refill within the hour.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::engine::{BudgetRecord, QuotaEngine};

/// File name under the state directory.
pub const FILE_NAME: &str = "quota-budgets.json";

#[derive(Serialize, Deserialize)]
struct Snapshot {
    version: u32,
    /// Wall-clock seconds when written.
    written: u64,
    budgets: Vec<BudgetRecord>,
}

/// Errors of the durable store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("reading {0}: {1}")]
    Read(PathBuf, std::io::Error),
    #[error("{0} is not a budget snapshot: {1}")]
    Parse(PathBuf, serde_json::Error),
    #[error("writing {0}: {1}")]
    Write(PathBuf, std::io::Error),
}

/// The records of the snapshot at `path` (none when it does not exist).
pub fn load(path: &Path) -> Result<Vec<BudgetRecord>, StoreError> {
    let text = match std::fs::read(path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(StoreError::Read(path.to_owned(), e)),
    };
    let snapshot: Snapshot =
        serde_json::from_slice(&text).map_err(|e| StoreError::Parse(path.to_owned(), e))?;
    Ok(snapshot.budgets)
}

/// Writes atomically: a reader (or a crash) sees the old snapshot or the new one, never half.
pub fn write(path: &Path, budgets: Vec<BudgetRecord>) -> Result<(), StoreError> {
    use std::io::Write as _;
    let snapshot = Snapshot {
        version: 1,
        written: super::window::unix_now(),
        budgets,
    };
    let error = |e| StoreError::Write(path.to_owned(), e);
    let bytes = serde_json::to_vec(&snapshot).map_err(|e| error(std::io::Error::other(e)))?;
    let temporary = path.with_extension("json.tmp");
    let mut file = std::fs::File::create(&temporary).map_err(error)?;
    file.write_all(&bytes).map_err(error)?;
    file.sync_all().map_err(error)?;
    std::fs::rename(&temporary, path).map_err(error)?;
    Ok(())
}

/// Restores the snapshot into `engine`. A broken file is moved aside (`.corrupt`) and reported:
/// budgets then start from zero rather than keeping the daemon down.
pub fn restore(engine: &QuotaEngine, path: &Path) {
    match load(path) {
        Ok(records) if records.is_empty() => {}
        Ok(records) => {
            let restored = engine.restore(&records);
            info!(path = %path.display(), records = records.len(), restored, "budgets restored");
        }
        Err(e) => {
            let aside = path.with_extension("json.corrupt");
            let _ = std::fs::rename(path, &aside);
            warn!(error = %e, moved_to = %aside.display(), "budgets not restored; they start from zero");
        }
    }
}

/// Writes the budgets every `interval` when they changed, and once more at `stop`.
pub async fn run(engine: Arc<QuotaEngine>, path: PathBuf, interval: Duration, stop: CancellationToken) {
    let mut written = engine.generation();
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let stopping = tokio::select! {
            () = stop.cancelled() => true,
            _ = tick.tick() => false,
        };
        let generation = engine.generation();
        if generation != written {
            let budgets = engine.snapshot();
            let target = path.clone();
            match tokio::task::spawn_blocking(move || write(&target, budgets)).await {
                Ok(Ok(())) => {
                    written = generation;
                    debug!(path = %path.display(), "budgets written");
                }
                Ok(Err(e)) => warn!(error = %e, "budgets not written; retrying at the next interval"),
                Err(e) => warn!(error = %e, "budget writer task failed"),
            }
        }
        if stopping {
            break;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quota::engine::BudgetKind;

    #[test]
    fn snapshots_round_trip_and_a_missing_file_is_empty() {
        let dir = std::env::temp_dir().join(format!("ict-store-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let path = dir.join(FILE_NAME);
        let _ = std::fs::remove_file(&path);
        assert!(load(&path).expect("missing is fine").is_empty());
        let records = vec![BudgetRecord {
            rule: "team-a".into(),
            scope: Some("team-a".into()),
            budget: BudgetKind::CostDay,
            window: 20_781,
            used: 12.5,
        }];
        write(&path, records.clone()).expect("write");
        assert_eq!(load(&path).expect("load"), records);
        std::fs::write(&path, b"{not json").expect("corrupt");
        assert!(matches!(load(&path), Err(StoreError::Parse(..))));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
