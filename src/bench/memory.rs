//! Peak resident memory of one phase of the process (Linux): the kernel's high-water mark
//! (`VmHWM` of /proc/self/status), reset before the phase through /proc/self/clear_refs.
//!
//! Why the kernel's figure: it counts every allocation, candle's and the allocator's retained
//! pages included, which is what decides whether a run fits the machine; an allocator hook
//! would miss what a dependency maps itself.

use std::fs;

/// Runs `f` and returns its result with the peak RSS (GiB) while it ran; `None` where the
/// kernel does not offer the reset (not Linux, or /proc not writable).
pub fn peak_rss_gib<T>(f: impl FnOnce() -> anyhow::Result<T>) -> anyhow::Result<(Option<f64>, T)> {
    // The reset sets the mark to the current resident size, which still holds every free page
    // the allocator kept from earlier phases: return those first, or each phase reports the
    // largest peak before it.
    crate::model::device::release_cpu_memory();
    let reset = fs::write("/proc/self/clear_refs", "5").is_ok();
    let out = f()?;
    let peak = reset.then(|| status_kib("VmHWM:")).flatten();
    Ok((peak.map(|kib| kib as f64 / (1024.0 * 1024.0)), out))
}

/// Resident memory now (GiB): what a phase starts from (the weights, mostly).
pub fn rss_gib() -> Option<f64> {
    status_kib("VmRSS:").map(|kib| kib as f64 / (1024.0 * 1024.0))
}

fn status_kib(field: &str) -> Option<u64> {
    let status = fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with(field))?;
    line[field.len()..]
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_phase_that_touches_memory_raises_the_peak_above_the_start() {
        let Some(start) = rss_gib() else { return }; // not Linux
        let (peak, len) = peak_rss_gib(|| {
            let block = vec![1u8; 256 << 20];
            Ok(block.iter().map(|&b| b as usize).sum::<usize>())
        })
        .unwrap();
        assert_eq!(len, 256 << 20);
        if let Some(peak) = peak {
            assert!(peak >= start + 0.2, "peak {peak} GiB from {start} GiB");
        }
    }
}
