//! The JSON-lines file sink of health events, rotated by size (Envoy's health-check event
//! log): `health_events.log_path` gets one [`HealthEvent`](super::HealthEvent) per line.
//!
//! A thread of its own writes the file: the control plane only queues events (its queue is
//! bounded like any subscriber's), so a slow or full disk never delays a publication.
//!
//! # Rotation
//!
//! The log and its rotated copies (`PATH.1` newest ... `PATH.{n-1}` oldest) together hold at
//! most `log_max_bytes`: each file at most `log_max_bytes / n` bytes, where `n` is
//! `log_files` (fewer if that would leave a file under 4 KiB). When the next
//! line would not fit, the files shift by one (the oldest is deleted) and a new log starts.
//! Lines are written whole.
#![deny(unsafe_code)]

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::EventQueue;
use crate::config::HealthEventsConfig;
use crate::error::Error;
use crate::sync::{DataArc, Mutex, thread};

pub(crate) use crate::config::MIN_EVENT_LOG_FILE_BYTES as MIN_LOG_FILE_BYTES;

/// A log file and its rotated copies.
#[derive(Debug)]
pub(crate) struct RotatingFile {
    path: PathBuf,
    file: Option<File>,
    size: u64,
    file_cap: u64,
    files: u32,
}

impl RotatingFile {
    /// Opens (appending to) `path`.
    pub(crate) fn open(path: &Path, max_bytes: u64, files: u32) -> std::io::Result<Self> {
        let files = effective_files(max_bytes, files);
        let file = OpenOptions::new().create(true).append(true).open(path)?;
        let size = file.metadata()?.len();
        Ok(Self {
            path: path.to_owned(),
            file: Some(file),
            size,
            file_cap: max_bytes / u64::from(files),
            files,
        })
    }

    /// The path of rotated copy `i` (`0` is the log itself).
    pub(crate) fn rotated(path: &Path, i: u32) -> PathBuf {
        if i == 0 {
            return path.to_owned();
        }
        let mut name = path.as_os_str().to_owned();
        name.push(format!(".{i}"));
        PathBuf::from(name)
    }

    /// Appends `bytes` (whole lines), rotating first if they would not fit.
    pub(crate) fn write(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        let len = bytes.len() as u64;
        if self.size > 0 && self.size + len > self.file_cap {
            self.rotate()?;
        }
        let file = match &mut self.file {
            Some(file) => file,
            None => {
                let file = OpenOptions::new().create(true).append(true).open(&self.path)?;
                self.size = file.metadata()?.len();
                self.file.insert(file)
            }
        };
        file.write_all(bytes)?;
        self.size += len;
        Ok(())
    }

    fn rotate(&mut self) -> std::io::Result<()> {
        self.file = None;
        if self.files <= 1 {
            std::fs::remove_file(&self.path).or_else(not_found_ok)?;
        } else {
            std::fs::remove_file(Self::rotated(&self.path, self.files - 1)).or_else(not_found_ok)?;
            for i in (0..self.files - 1).rev() {
                std::fs::rename(Self::rotated(&self.path, i), Self::rotated(&self.path, i + 1))
                    .or_else(not_found_ok)?;
            }
        }
        let file = OpenOptions::new().create(true).append(true).open(&self.path)?;
        self.size = file.metadata()?.len();
        self.file = Some(file);
        Ok(())
    }

    pub(crate) fn flush(&mut self) -> std::io::Result<()> {
        match &mut self.file {
            Some(file) => file.flush(),
            None => Ok(()),
        }
    }
}

fn not_found_ok(e: std::io::Error) -> std::io::Result<()> {
    if e.kind() == std::io::ErrorKind::NotFound {
        Ok(())
    } else {
        Err(e)
    }
}

/// `files`, lowered so that each file holds at least [`MIN_LOG_FILE_BYTES`].
pub(crate) fn effective_files(max_bytes: u64, files: u32) -> u32 {
    let most = (max_bytes / MIN_LOG_FILE_BYTES).clamp(1, u64::from(u32::MAX)) as u32;
    files.clamp(1, most)
}

/// A running file sink: its thread and its queue.
#[derive(Debug)]
pub(crate) struct EventLog {
    queue: DataArc<EventQueue>,
    thread: Mutex<Option<thread::JoinHandle<()>>>,
}

impl EventLog {
    /// Opens the log and starts its writer on `queue` (already subscribed).
    pub(crate) fn start(config: &HealthEventsConfig, queue: DataArc<EventQueue>) -> Result<Self, Error> {
        let Some(path) = config.log_path.clone() else {
            return Err(Error::invalid_config("health_events.log_path", "not set"));
        };
        let mut file = RotatingFile::open(&path, config.log_max_bytes, config.log_files).map_err(|e| {
            Error::invalid_config(
                "health_events.log_path",
                format!("cannot open {} for appending: {e}", path.display()),
            )
        })?;
        let reader = queue.clone();
        let handle = thread::spawn("tai-lb-event-log".to_owned(), move || {
            let mut failures = 0u64;
            loop {
                let (events, closed) = reader.wait(Duration::from_millis(500));
                if !events.is_empty() {
                    let mut buffer = Vec::with_capacity(events.len() * 160);
                    let mut result = Ok(());
                    for event in &events {
                        buffer.clear();
                        buffer.extend_from_slice(event.to_json_line().as_bytes());
                        buffer.push(b'\n');
                        result = result.and_then(|()| file.write(&buffer));
                    }
                    if let Err(e) = result.and_then(|()| file.flush()) {
                        failures += 1;
                        // 1, 2, 4, 8...: a full disk does not flood the log.
                        if failures.is_power_of_two() {
                            tracing::warn!(path = %path.display(), error = %e, failures, "cannot write the health event log");
                        }
                    }
                }
                if closed {
                    return;
                }
            }
        })
        .map_err(|e| Error::ControlPlane {
            message: format!("cannot start the health event log's thread: {e}"),
        })?;
        Ok(Self {
            queue,
            thread: Mutex::new(Some(handle)),
        })
    }

    /// Ends the log: writes what is queued, then joins the thread. Idempotent.
    pub(crate) fn stop(&self) {
        self.queue.close();
        let handle = self.thread.lock().take();
        if let Some(handle) = handle {
            if handle.join().is_err() {
                tracing::error!("the health event log's thread panicked");
            }
        }
    }
}

#[cfg(all(test, not(tai_loadbalancer_loom)))]
mod tests {
    use super::*;

    #[test]
    fn files_are_lowered_to_keep_each_above_the_minimum() {
        assert_eq!(effective_files(10 << 20, 4), 4);
        assert_eq!(effective_files(MIN_LOG_FILE_BYTES, 4), 1);
        assert_eq!(effective_files(3 * MIN_LOG_FILE_BYTES, 10), 3);
        assert_eq!(effective_files(u64::MAX, u32::MAX), u32::MAX);
    }

    #[test]
    fn rotation_keeps_the_total_under_the_bound_and_the_newest_lines() {
        let dir = std::env::temp_dir().join(format!("tai-lb-rotation-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("events.jsonl");
        let max = 3 * MIN_LOG_FILE_BYTES;
        let mut file = RotatingFile::open(&path, max, 3).unwrap();
        for i in 0..2000 {
            file.write(format!("{{\"seq\":{i},\"pad\":\"{}\"}}\n", "x".repeat(i % 50)).as_bytes())
                .unwrap();
        }
        file.flush().unwrap();
        let mut total = 0;
        let mut seqs = Vec::new();
        for i in (0..3).rev() {
            let text = std::fs::read_to_string(RotatingFile::rotated(&path, i)).unwrap();
            assert!(
                text.len() as u64 <= MIN_LOG_FILE_BYTES,
                "file {i}: {}",
                text.len()
            );
            total += text.len() as u64;
            for line in text.lines() {
                let v: serde_json::Value = serde_json::from_str(line).unwrap();
                seqs.push(v["seq"].as_u64().unwrap());
            }
        }
        assert!(total <= max, "{total} > {max}");
        assert!(!RotatingFile::rotated(&path, 3).exists());
        assert_eq!(*seqs.last().unwrap(), 1999, "the newest line is kept");
        assert!(
            seqs.windows(2).all(|w| w[1] == w[0] + 1),
            "contiguous, oldest first"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
