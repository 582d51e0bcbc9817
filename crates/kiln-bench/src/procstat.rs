//! Process accounting from `/proc`: CPU time (utime + stime of every thread
//! of a process, from `/proc/PID/stat`) and resident memory (`VmRSS` from
//! `/proc/PID/status`).

use std::time::Duration;

use crate::error::{BenchError, Result};

/// CPU time a process has used, in clock ticks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct CpuTicks {
    pub user: u64,
    pub system: u64,
}

impl CpuTicks {
    pub fn total(&self) -> u64 {
        self.user + self.system
    }

    /// Ticks used between `earlier` and `self` (saturating: counters never
    /// go backwards for a live process, but a restarted PID could).
    pub fn since(&self, earlier: &CpuTicks) -> CpuTicks {
        CpuTicks {
            user: self.user.saturating_sub(earlier.user),
            system: self.system.saturating_sub(earlier.system),
        }
    }
}

/// Parses the content of `/proc/PID/stat`. The second field (the command
/// name in parentheses) may itself contain spaces and parentheses, so the
/// fields are counted from the LAST `)`. utime and stime are fields 14 and
/// 15 (1-based) of proc(5).
pub fn parse_stat(content: &str) -> Result<CpuTicks> {
    let close = content
        .rfind(')')
        .ok_or_else(|| BenchError::new(format!("no ')' in /proc stat line {content:?}")))?;
    // Fields after the command name start at field 3 (state).
    let rest: Vec<&str> = content[close + 1..].split_whitespace().collect();
    let field = |n: usize| -> Result<u64> {
        // field n (1-based) is rest[n - 3]
        let s = rest
            .get(n - 3)
            .ok_or_else(|| BenchError::new(format!("/proc stat line has no field {n}")))?;
        s.parse::<u64>()
            .map_err(|e| BenchError::new(format!("/proc stat field {n} {s:?} is not a number: {e}")))
    };
    Ok(CpuTicks {
        user: field(14)?,
        system: field(15)?,
    })
}

/// Parses `VmRSS:  1234 kB` out of `/proc/PID/status`; returns bytes.
pub fn parse_vmrss(status: &str) -> Result<u64> {
    for line in status.lines() {
        if let Some(rest) = line.strip_prefix("VmRSS:") {
            let mut parts = rest.split_whitespace();
            let value = parts
                .next()
                .ok_or_else(|| BenchError::new("VmRSS line has no value"))?;
            let kib: u64 = value
                .parse()
                .map_err(|e| BenchError::new(format!("VmRSS value {value:?}: {e}")))?;
            return match parts.next() {
                Some("kB") | None => Ok(kib * 1024),
                Some(unit) => Err(BenchError::new(format!("unexpected VmRSS unit {unit:?}"))),
            };
        }
    }
    Err(BenchError::new("no VmRSS line (kernel thread or zombie?)"))
}

/// Clock ticks per second for `/proc/PID/stat` times: `getconf CLK_TCK`,
/// or 100 (the value on every mainstream Linux build) if getconf fails.
pub fn clock_ticks_per_sec() -> u64 {
    std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .filter(|o| o.status.success())
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse::<u64>().ok())
        .filter(|&t| t > 0)
        .unwrap_or(100)
}

/// Watches one process (the server under test, or this client itself).
#[derive(Debug, Clone)]
pub struct ProcWatch {
    /// `None` means this process (`/proc/self`).
    pid: Option<u32>,
    ticks_per_sec: u64,
}

impl ProcWatch {
    pub fn pid(pid: u32, ticks_per_sec: u64) -> Self {
        ProcWatch {
            pid: Some(pid),
            ticks_per_sec,
        }
    }

    pub fn this_process(ticks_per_sec: u64) -> Self {
        ProcWatch {
            pid: None,
            ticks_per_sec,
        }
    }

    fn path(&self, file: &str) -> String {
        match self.pid {
            Some(pid) => format!("/proc/{pid}/{file}"),
            None => format!("/proc/self/{file}"),
        }
    }

    fn read(&self, file: &str) -> Result<String> {
        let path = self.path(file);
        std::fs::read_to_string(&path).map_err(|e| BenchError::new(format!("reading {path}: {e}")))
    }

    pub fn cpu(&self) -> Result<CpuTicks> {
        parse_stat(&self.read("stat")?)
    }

    pub fn rss_bytes(&self) -> Result<u64> {
        parse_vmrss(&self.read("status")?)
    }

    pub fn ticks_to_duration(&self, ticks: u64) -> Duration {
        ticks_to_duration(ticks, self.ticks_per_sec)
    }
}

pub fn ticks_to_duration(ticks: u64, ticks_per_sec: u64) -> Duration {
    let tps = ticks_per_sec.max(1);
    Duration::from_secs(ticks / tps) + Duration::from_nanos((ticks % tps) * 1_000_000_000 / tps)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_with_awkward_command_name() {
        // comm contains spaces and a ')' — fields must be counted from the last ')'.
        let line = "4242 (kiln (x) y) S 1 4242 4242 0 -1 4194560 1234 0 0 0 \
                    777 333 0 0 20 0 9 0 12345 1000000 2000 18446744073709551615";
        let t = parse_stat(line).unwrap();
        assert_eq!(
            t,
            CpuTicks {
                user: 777,
                system: 333
            }
        );
        assert_eq!(t.total(), 1110);
    }

    #[test]
    fn stat_truncated_is_an_error() {
        assert!(parse_stat("1 (a) S 1 2 3").is_err());
        assert!(parse_stat("garbage").is_err());
    }

    #[test]
    fn own_stat_parses() {
        let w = ProcWatch::this_process(clock_ticks_per_sec());
        let a = w.cpu().unwrap();
        // Burn a little CPU; counters must not go backwards.
        let mut x = 0u64;
        for i in 0..2_000_000u64 {
            x = x.wrapping_mul(31).wrapping_add(i);
        }
        std::hint::black_box(x);
        let b = w.cpu().unwrap();
        assert!(b.total() >= a.total());
        assert!(w.rss_bytes().unwrap() > 1024 * 1024);
    }

    #[test]
    fn vmrss_parsing() {
        let status = "Name:\tkiln\nVmPeak:\t  100 kB\nVmRSS:\t   2048 kB\nThreads:\t3\n";
        assert_eq!(parse_vmrss(status).unwrap(), 2048 * 1024);
        assert!(parse_vmrss("Name:\tkthreadd\n").is_err());
        assert!(parse_vmrss("VmRSS:\t12 MB\n").is_err());
    }

    #[test]
    fn ticks_convert() {
        assert_eq!(ticks_to_duration(250, 100), Duration::from_millis(2500));
        assert_eq!(ticks_to_duration(1, 1000), Duration::from_millis(1));
        assert_eq!(ticks_to_duration(5, 0), Duration::from_secs(5));
    }
}
