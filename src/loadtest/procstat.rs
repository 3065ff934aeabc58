//! Server-side figures: CPU time and RSS of a process from /proc, and counters from
//! an edgerelay `/metrics` endpoint.

use std::time::Duration;

/// CPU time and memory of a process at one instant.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct ProcSample {
    /// utime + stime, in seconds (all threads).
    pub cpu_seconds: f64,
    /// Resident set size in KiB.
    pub rss_kb: u64,
}

/// Clock ticks per second for /proc/PID/stat (`getconf CLK_TCK`, 100 if unknown).
pub fn clock_ticks() -> f64 {
    std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse::<f64>().ok())
        .filter(|t| *t > 0.0)
        .unwrap_or(100.0)
}

/// Parses utime + stime (in ticks) from the text of /proc/PID/stat.
pub fn parse_stat_ticks(stat: &str) -> Option<u64> {
    // The command name may contain spaces and parentheses: fields follow the last ')'.
    let rest = &stat[stat.rfind(')')? + 1..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // rest starts at field 3 (state); utime is field 14, stime field 15.
    let utime: u64 = f.get(11)?.parse().ok()?;
    let stime: u64 = f.get(12)?.parse().ok()?;
    Some(utime + stime)
}

/// Parses VmRSS (KiB) from the text of /proc/PID/status.
pub fn parse_status_rss_kb(status: &str) -> Option<u64> {
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
}

/// Reads CPU seconds and RSS of `pid`.
pub fn sample(pid: u32, ticks_per_sec: f64) -> anyhow::Result<ProcSample> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let ticks =
        parse_stat_ticks(&stat).ok_or_else(|| anyhow::anyhow!("cannot parse /proc/{pid}/stat"))?;
    Ok(ProcSample {
        cpu_seconds: ticks as f64 / ticks_per_sec,
        rss_kb: parse_status_rss_kb(&status).unwrap_or(0),
    })
}

/// Reads one counter (sum over its label sets) from a Prometheus text endpoint.
pub async fn scrape_counter(
    client: &reqwest::Client,
    url: &str,
    name: &str,
) -> anyhow::Result<f64> {
    let text = client
        .get(url)
        .timeout(Duration::from_secs(5))
        .send()
        .await?
        .error_for_status()?
        .text()
        .await?;
    parse_counter(&text, name).ok_or_else(|| anyhow::anyhow!("{name} not found at {url}"))
}

/// Sums the samples of metric `name` in Prometheus exposition text.
pub fn parse_counter(text: &str, name: &str) -> Option<f64> {
    let mut found = None;
    for l in text.lines() {
        let Some(rest) = l.strip_prefix(name) else {
            continue;
        };
        if !(rest.starts_with(' ') || rest.starts_with('{')) {
            continue;
        }
        let v = rest.rsplit(' ').next().and_then(|v| v.parse::<f64>().ok());
        if let Some(v) = v {
            found = Some(found.unwrap_or(0.0) + v);
        }
    }
    found
}

/// UDP counters of a network namespace (from /proc/PID/net/snmp).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct UdpCounters {
    /// Datagrams delivered to sockets.
    pub in_datagrams: u64,
    /// Datagrams dropped because a socket's receive buffer was full.
    pub rcvbuf_errors: u64,
    /// Datagrams dropped because a socket's send buffer was full.
    pub sndbuf_errors: u64,
}

/// Parses the `Udp:` lines of /proc/net/snmp.
pub fn parse_snmp_udp(text: &str) -> Option<UdpCounters> {
    let mut lines = text.lines().filter(|l| l.starts_with("Udp:"));
    let names: Vec<&str> = lines.next()?.split_whitespace().collect();
    let vals: Vec<&str> = lines.next()?.split_whitespace().collect();
    let get = |n: &str| {
        names
            .iter()
            .position(|x| *x == n)
            .and_then(|i| vals.get(i))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    Some(UdpCounters {
        in_datagrams: get("InDatagrams"),
        rcvbuf_errors: get("RcvbufErrors"),
        sndbuf_errors: get("SndbufErrors"),
    })
}

/// UDP counters of the network namespace `pid` lives in.
pub fn udp_counters(pid: u32) -> Option<UdpCounters> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/net/snmp")).ok()?;
    parse_snmp_udp(&text)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_proc_files_and_metrics() {
        let stat = "1234 (my (odd) name) S 1 2 3 4 5 6 7 8 9 10 250 50 0 0 20 0 4 0";
        assert_eq!(parse_stat_ticks(stat), Some(300));
        assert_eq!(parse_stat_ticks("garbage"), None);
        let status = "Name:\tx\nVmRSS:\t  10240 kB\nThreads: 3\n";
        assert_eq!(parse_status_rss_kb(status), Some(10240));
        let m = "# TYPE edgerelay_rtp_packets_out_total counter\n\
                 edgerelay_rtp_packets_out_total 1234\n\
                 edgerelay_rtp_packets_out_totalx 5\n\
                 edgerelay_dropped_packets_total{reason=\"a\"} 2\n\
                 edgerelay_dropped_packets_total{reason=\"b\"} 3\n";
        assert_eq!(
            parse_counter(m, "edgerelay_rtp_packets_out_total"),
            Some(1234.0)
        );
        assert_eq!(
            parse_counter(m, "edgerelay_dropped_packets_total"),
            Some(5.0)
        );
        assert_eq!(parse_counter(m, "nope"), None);
        let snmp = "Udp: InDatagrams NoPorts InErrors OutDatagrams RcvbufErrors SndbufErrors\n\
                    Udp: 100 1 2 90 7 3\n";
        assert_eq!(
            parse_snmp_udp(snmp),
            Some(UdpCounters {
                in_datagrams: 100,
                rcvbuf_errors: 7,
                sndbuf_errors: 3
            })
        );
        assert!(udp_counters(std::process::id()).is_some());
        let me = sample(std::process::id(), clock_ticks()).expect("own /proc");
        assert!(me.rss_kb > 0);
    }
}
