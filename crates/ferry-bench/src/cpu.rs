//! Where the machine's CPU went during a drain (`--relay-alone`): the CPU time of every
//! process on the box, grouped by command name, and the box's idle time, read from `/proc`
//! at the relays' start and once the outbox is empty. The database and the broker usually
//! share the machine with the bench, so "this process" is the relays' share (and an
//! embedded store's, SQLite), and the rest are the servers'.

use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::time::Instant;

/// A group's share of the box below which it is left out of the report.
const REPORTED_SHARE: f64 = 0.005;

/// The group of every kernel thread (`kworker/0:1-events` and the like change their name
/// with the work they do, so they are not told apart).
const KERNEL_THREADS: &str = "kernel threads";

/// CPU times read from `/proc` at one instant, in clock ticks.
pub(crate) struct CpuSample {
    at: Instant,
    /// Every other process by pid: its group and its user + system time, with the time of
    /// its children that exited and were waited for (PostgreSQL's backends, once reaped,
    /// count in the postmaster's).
    processes: HashMap<u32, (String, i64)>,
    /// This process's own user + system time.
    own: i64,
    /// The box's CPUs, as `/proc/stat` lists them.
    cpus: usize,
    /// Their idle and iowait time.
    idle: i64,
}

impl CpuSample {
    /// Reads the CPU times now; `None` where `/proc` is not Linux's.
    pub(crate) fn take() -> Option<Self> {
        let own_pid = std::process::id();
        let mut processes = HashMap::new();
        let mut own = None;
        for entry in fs::read_dir("/proc").ok()?.flatten() {
            let Some(pid) = entry
                .file_name()
                .to_str()
                .and_then(|n| n.parse::<u32>().ok())
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
                continue;
            }
            // Kernel threads are kthreadd (pid 2) and its children.
            let group = if pid == 2 || times.parent == 2 {
                KERNEL_THREADS.to_owned()
            } else {
                times.command
            };
            let used = times.user + times.system + times.children_user + times.children_system;
            processes.insert(pid, (group, used));
        }
        let (cpus, idle) = box_cpus(&fs::read_to_string("/proc/stat").ok()?)?;
        Some(Self {
            at: Instant::now(),
            processes,
            own: own?,
            cpus,
            idle,
        })
    }

    /// Ticks each group used between `start` and this sample. A process that exited in
    /// between is taken off its group at what it had used by `start`: what it used in all
    /// shows in its parent's children time once reaped (else it is lost, as it is to `top`).
    /// A pid reused by a new process can make a group's figure go down.
    fn used_since<'a>(&'a self, start: &'a Self) -> BTreeMap<&'a str, i64> {
        let mut used: BTreeMap<&str, i64> = BTreeMap::new();
        for (pid, (group, ticks)) in &self.processes {
            let before = start.processes.get(pid).map_or(0, |(_, ticks)| *ticks);
            *used.entry(group).or_default() += ticks - before;
        }
        for (pid, (group, ticks)) in &start.processes {
            if !self.processes.contains_key(pid) {
                *used.entry(group).or_default() -= ticks;
            }
        }
        used
    }

    /// What each part spent between `start` and this sample, per message of `messages`:
    /// printable lines, largest share first.
    pub(crate) fn report_since(&self, start: &Self, messages: u64) -> Vec<String> {
        let ticks_per_second = rustix::param::clock_ticks_per_second() as f64;
        let wall = self.at.saturating_duration_since(start.at);
        let cpus = self.cpus;
        let box_seconds = wall.as_secs_f64() * cpus as f64;
        let seconds = |ticks: i64| ticks.max(0) as f64 / ticks_per_second;
        let mut parts: Vec<(String, f64)> = self
            .used_since(start)
            .into_iter()
            .map(|(group, ticks)| (group.to_owned(), seconds(ticks)))
            .filter(|(_, used)| *used >= box_seconds * REPORTED_SHARE)
            .collect();
        parts.push((
            "this process (the relays)".to_owned(),
            seconds(self.own - start.own),
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
        let idle = seconds(self.idle - start.idle);
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
    parent: u32,
    user: i64,
    system: i64,
    children_user: i64,
    children_system: i64,
}

impl ProcessTimes {
    /// Parses one `stat` line: `pid (comm) state ppid ...`, the times being fields 14-17.
    /// The command may hold spaces and parentheses, so it ends at the last `)`.
    fn parse(stat: &str) -> Option<Self> {
        let open = stat.find('(')?;
        let close = stat.rfind(')')?;
        let command = stat.get(open + 1..close)?.to_owned();
        // After the command: field 3 (state), 4 (parent pid), …, 14 (utime).
        let mut fields = stat.get(close + 1..)?.split_whitespace().skip(1);
        let parent = fields.next()?.parse::<u32>().ok()?;
        let mut fields = fields.skip(9);
        let mut next = || fields.next()?.parse::<i64>().ok();
        Some(Self {
            command,
            parent,
            user: next()?,
            system: next()?,
            children_user: next()?,
            children_system: next()?,
        })
    }
}

/// The CPUs the `cpuN` lines of `/proc/stat` list, and the idle plus iowait ticks of all
/// of them from its `cpu` line.
fn box_cpus(stat: &str) -> Option<(usize, i64)> {
    let line = stat.lines().find(|line| line.starts_with("cpu "))?;
    let mut fields = line.split_whitespace().skip(4);
    let idle = fields.next()?.parse::<i64>().ok()?;
    let iowait = fields.next()?.parse::<i64>().ok()?;
    let cpus = stat
        .lines()
        .filter(|line| line.starts_with("cpu") && !line.starts_with("cpu "))
        .count();
    Some((cpus.max(1), idle + iowait))
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
                parent: 1,
                user: 150,
                system: 25,
                children_user: 7,
                children_system: 3,
            })
        );
        assert_eq!(ProcessTimes::parse("4242 (cut"), None);
    }

    fn sample(processes: &[(u32, &str, i64)]) -> CpuSample {
        CpuSample {
            at: Instant::now(),
            processes: processes
                .iter()
                .map(|(pid, group, ticks)| (*pid, ((*group).to_owned(), *ticks)))
                .collect(),
            own: 0,
            cpus: 1,
            idle: 0,
        }
    }

    #[test]
    fn exited_new_and_renamed_processes_count_once() {
        // A backend (11) exits and is reaped: its 55 ticks land in the postmaster's
        // children time, of which 50 were used before the start. A server starts (30).
        let start = sample(&[
            (10, "postgres", 100),
            (11, "postgres", 50),
            (20, KERNEL_THREADS, 5),
        ]);
        let end = sample(&[
            (10, "postgres", 160),
            (20, KERNEL_THREADS, 7),
            (30, "nats-server", 40),
        ]);
        let used = end.used_since(&start);
        assert_eq!(
            used.into_iter().collect::<Vec<_>>(),
            [("kernel threads", 2), ("nats-server", 40), ("postgres", 10)]
        );
    }

    #[test]
    fn box_cpus_counts_cpus_and_adds_iowait() {
        let stat = "cpu  100 5 50 1000 20 0 3 0 0 0\ncpu0 50 2 25 500 10 0 1 0 0 0\n";
        assert_eq!(box_cpus(stat), Some((1, 1020)));
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
            if u64::try_from(sample.own - start.own).unwrap_or(0) >= ticks / 5
                || Instant::now() > give_up
            {
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
