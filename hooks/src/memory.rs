//! How much memory the machine can still give: a job whose buffers are sized by a flag is
//! refused up front, naming the flag, instead of dying in the allocator or the OOM killer.

use crate::{Error, Result};

/// Bytes this process can still allocate, as far as Linux tells: the machine's
/// `MemAvailable` (`/proc/meminfo`), or less when the process's control group (a container,
/// a Slurm job) has a memory limit (cgroup v2 `memory.max` minus `memory.current`). `None`
/// where neither can be read (not Linux): then nothing is refused.
pub fn available_bytes() -> Option<u64> {
    let machine = (|| {
        let text = std::fs::read_to_string("/proc/meminfo").ok()?;
        let line = text.lines().find(|l| l.starts_with("MemAvailable:"))?;
        let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
        kib.checked_mul(1024)
    })();
    let group = (|| {
        let number = |file: &str| -> Option<u64> {
            std::fs::read_to_string(format!("/sys/fs/cgroup/{file}"))
                .ok()?
                .trim()
                .parse()
                .ok()
        };
        Some(number("memory.max")?.saturating_sub(number("memory.current")?))
    })();
    match (machine, group) {
        (Some(m), Some(g)) => Some(m.min(g)),
        (m, g) => m.or(g),
    }
}

/// Refuses `bytes` (`None`: past u64, from an overflowing product) for `what` when they are
/// more than the memory available, with `advice` on what to lower.
pub fn check_fits(what: &str, bytes: Option<u64>, advice: &str) -> Result<()> {
    let available = available_bytes();
    let fits = match (bytes, available) {
        (Some(bytes), Some(available)) => bytes <= available,
        (Some(_), None) => true,
        (None, _) => false,
    };
    if fits {
        return Ok(());
    }
    let gib = |b: u64| b as f64 / f64::from(1 << 30);
    let needed = bytes.map_or("more than 2^64 bytes".into(), |b| {
        format!("{:.1} GiB", gib(b))
    });
    let have = available.map_or(String::new(), |a| {
        format!(", but {:.1} GiB are available", gib(a))
    });
    Err(Error::InvalidArgument(format!(
        "{what} needs {needed}{have}: {advice}"
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refuses_what_cannot_fit() {
        assert!(check_fits("a buffer", Some(1 << 20), "lower it").is_ok());
        let message = check_fits("--chunk-tokens 9", None, "lower it")
            .unwrap_err()
            .to_string();
        assert!(
            message.contains("--chunk-tokens 9 needs more than 2^64 bytes")
                && message.ends_with(": lower it"),
            "{message}"
        );
        if let Some(available) = available_bytes() {
            assert!(available > 0);
            let message = check_fits("x", Some(available.saturating_mul(4)), "lower it")
                .unwrap_err()
                .to_string();
            assert!(message.contains("GiB are available: lower it"), "{message}");
        }
    }
}
