//! Where the machine's CPU went during a drain (`--relay-alone`): the CPU time of every
//! process on the box, grouped by command name, and the box's idle time, read from `/proc`
//! at the relays' start and once the outbox is empty. The database and the broker usually
//! share the machine with the bench, so "this process" is the relays' share (and an
//! embedded store's, SQLite), and the rest are the servers'.

use std::collections::BTreeMap;
use std::fs;
use std::time::Instant;

/// A group's share of the box below which it is left out of the report.
const REPORTED_SHARE: f64 = 0.005;

/// CPU times read from `/proc` at one instant, in clock ticks.
pub(crate) struct CpuSample {
    at: Instant,
    /// Per command name: user + system time of its processes, with the time of their
    /// children that exited and were waited for (PostgreSQL's backends, once reaped, count
    /// in the postmaster's).
    by_command: BTreeMap<String, u64>,
    /// This process's own user + system time.
    own: u64,
    /// The box's idle and iowait time, all CPUs.
    idle: u64,
}

impl CpuSample {
    /// Reads the CPU times now; `None` where `/proc` is not Linux's.
    pub(crate) fn take() -> Option<Self> {
        let own_pid = std::process::id().to_string();
        let mut by_command = BTreeMap::new();
        let mut own = None;
        for entry in fs::read_dir("/proc").ok()?.flatten() {
            let name = entry.file_name();
            let Some(pid) = name
                .to_str()
                .filter(|n| n.bytes().all(|b| b.is_ascii_digit()))
            else {
                continue;
            };
            // A process may exit between the listing and the read.
            let Some(times) = fs::read_to_string(entry.path().join("stat"))
                .ok()
                .and_then(|stat| ProcessTimes::parse(&stat))
            else {
                continue;
            };
            if pid == own_pid {
                own = Some(times.user + times.system);
            } else {
                *by_command.entry(times.command).or_insert(0) +=
                    times.user + times.system + times.children_user + times.children_system;
            }
        }
        Some(Self {
            at: Instant::now(),
            by_command,
            own: own?,
            idle: box_idle(&fs::read_to_string("/proc/stat").ok()?)?,
        })
    }

    /// What each part spent between `start` and this sample, per message of `messages`:
    /// printable lines, largest share first.
    pub(crate) fn report_since(&self, start: &Self, messages: u64) -> Vec<String> {
        let ticks_per_second = rustix::param::clock_ticks_per_second() as f64;
        let wall = self.at.saturating_duration_since(start.at);
        let cpus = std::thread::available_parallelism().map_or(1, usize::from);
        let box_seconds = wall.as_secs_f64() * cpus as f64;
        let seconds = |ticks: u64| ticks as f64 / ticks_per_second;
        let mut parts: Vec<(String, f64)> = self
            .by_command
            .iter()
            .map(|(command, &ticks)| {
                let before = start.by_command.get(command).copied().unwrap_or(0);
                (command.clone(), seconds(ticks.saturating_sub(before)))
            })
            .filter(|(_, used)| *used >= box_seconds * REPORTED_SHARE)
            .collect();
        parts.push((
            "this process (the relays)".to_owned(),
            seconds(self.own.saturating_sub(start.own)),
        ));
        parts.sort_by(|a, b| b.1.total_cmp(&a.1));
        let per_message = |used: f64| used * 1e6 / messages.max(1) as f64;
        let mut lines = vec![format!(
            "cpu during the drain ({:.2} s on {cpus} CPUs, {:.1} CPU-s; from /proc, processes \
             grouped by command, each at least {:.1}% of the box):",
            wall.as_secs_f64(),
            box_seconds,
            REPORTED_SHARE * 100.0
        )];
        lines.extend(parts.iter().map(|(part, used)| {
            format!(
                "  {part}: {used:.2} CPU-s, {:.2} µs per message",
                per_message(*used)
            )
        }));
        let idle = seconds(self.idle.saturating_sub(start.idle));
        let busy: f64 = parts.iter().map(|(_, used)| used).sum();
        lines.push(format!(
            "  box idle: {idle:.2} CPU-s; the parts above: {:.2} µs per message in all, a \
             ceiling of {:.0} msg/s on {cpus} CPUs if nothing else ran",
            per_message(busy),
            ceiling(busy, messages, cpus)
        ));
        lines
    }
}

/// Messages per second the machine could carry at `used` CPU-s for `messages`.
fn ceiling(used: f64, messages: u64, cpus: usize) -> f64 {
    if used <= 0.0 {
        return f64::INFINITY;
    }
    messages as f64 / used * cpus as f64
}

/// The fields of `/proc/<pid>/stat` the report needs.
#[derive(Debug, PartialEq)]
struct ProcessTimes {
    command: String,
    user: u64,
    system: u64,
    children_user: u64,
    children_system: u64,
}

impl ProcessTimes {
    /// Parses one `stat` line: `pid (comm) state ppid ...`, the times being fields 14-17.
    /// The command may hold spaces and parentheses, so it ends at the last `)`.
    fn parse(stat: &str) -> Option<Self> {
        let open = stat.find('(')?;
        let close = stat.rfind(')')?;
        let command = stat.get(open + 1..close)?.to_owned();
        // After the command: field 3 (state) onwards; utime is field 14.
        let mut fields = stat.get(close + 1..)?.split_whitespace().skip(11);
        let mut next = || fields.next()?.parse::<u64>().ok();
        Some(Self {
            command,
            user: next()?,
            system: next()?,
            children_user: next()?,
            children_system: next()?,
        })
    }
}

/// Idle plus iowait ticks of all CPUs, from the `cpu` line of `/proc/stat`.
fn box_idle(stat: &str) -> Option<u64> {
    let line = stat.lines().find(|line| line.starts_with("cpu "))?;
    let mut fields = line.split_whitespace().skip(4);
    let idle = fields.next()?.parse::<u64>().ok()?;
    let iowait = fields.next()?.parse::<u64>().ok()?;
    Some(idle + iowait)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_lines_with_odd_command_names_parse() {
        let stat = "4242 (tokio (x) 1) S 1 4242 4242 0 -1 4194560 100 0 0 0 \
                    150 25 7 3 20 0 9 0 1000 1000000 500";
        assert_eq!(
            ProcessTimes::parse(stat),
            Some(ProcessTimes {
                command: "tokio (x) 1".to_owned(),
                user: 150,
                system: 25,
                children_user: 7,
                children_system: 3,
            })
        );
        assert_eq!(ProcessTimes::parse("4242 (cut"), None);
    }

    #[test]
    fn box_idle_adds_iowait() {
        let stat = "cpu  100 5 50 1000 20 0 3 0 0 0\ncpu0 50 2 25 500 10 0 1 0 0 0\n";
        assert_eq!(box_idle(stat), Some(1020));
    }

    #[test]
    fn a_drain_is_reported_per_message() {
        let start = CpuSample::take().expect("this test runs on Linux");
        // Spin until this process has used at least 0.2 CPU-s (the box may be shared).
        let give_up = Instant::now() + std::time::Duration::from_secs(30);
        let end = loop {
            let mut spin = 0_u64;
            for step in 0..1_000_000_u64 {
                spin = spin.wrapping_add(step);
            }
            assert!(spin > 0);
            let sample = CpuSample::take().expect("this test runs on Linux");
            let ticks = rustix::param::clock_ticks_per_second();
            if sample.own - start.own >= ticks / 5 || Instant::now() > give_up {
                break sample;
            }
        };
        let lines = end.report_since(&start, 1000);
        let own = lines
            .iter()
            .find(|line| line.contains("this process"))
            .expect("this process is always listed");
        let figures: Vec<f64> = own
            .split([':', ','])
            .filter_map(|part| part.split_whitespace().next()?.parse().ok())
            .collect();
        let [used, per_message] = figures[..] else {
            panic!("two figures expected in {own:?}");
        };
        assert!(used >= 0.2, "{lines:?}");
        // 1000 messages: µs per message is CPU-s times 1000.
        assert!((per_message - used * 1000.0).abs() < 10.0, "{lines:?}");
        assert!(lines.last().is_some_and(|line| line.contains("box idle")));
    }
}
