//! Peak resident memory of a benchmark process, shared by the Rust benchmark programs
//! (`#[path = "peak_rss.rs"] mod peak_rss;`).

/// Peak resident memory of this process (Linux `VmHWM`), 0 where unavailable.
pub fn peak_rss_mib() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kib| kib.parse::<f64>().ok())
        })
        .map_or(0.0, |kib| kib / 1024.0)
}
