//! The call budget: `plugins.call_deadline` is CPU time the call may spend, not wall time, per
//! [`BUDGET_BYTES`] of payload begun ([`call_budget`]): parsing costs time in proportion to the
//! message, and a valid message of the largest size a device may send (128 KiB) costs a plugin
//! ~2–4 ms on its own (`cargo xtask bench`), too close to a 5 ms budget once cores are shared.
//!
//! A call runs synchronously on the calling thread, so the thread's CPU clock
//! (`CLOCK_THREAD_CPUTIME_ID`) measures exactly what the call spent. The epoch ticker only wakes
//! the call up: when the epoch deadline passes, [`verdict`] compares the CPU time and the wall
//! time since the call began and either lets it continue (for about the budget it has left) or
//! stops it. So a call that was merely waiting for a core while the machine was busy (logins
//! hashing passwords, a burst on other threads) is not stopped for time it never ran.
//!
//! What must stay true:
//! - a call that has spent its CPU budget is stopped ([`Verdict::CpuSpent`]): that is the
//!   plugin's doing on that message, and it counts against the device that sent it;
//! - whatever the CPU says, no call runs longer than the wall-clock cap ([`wall_cap`]: the
//!   longer of [`WALL_CAP_FACTOR`] × the budget and [`WALL_CAP_FLOOR`]) ([`Verdict::WallCap`]):
//!   a starved call cannot hold the pipeline forever. That stop is the machine's doing and is
//!   not counted against anyone;
//! - if the thread's CPU clock cannot be read (never on Linux), wall time stands in for it:
//!   the budget is then what it was before, a wall-clock deadline.

use std::time::{Duration, Instant};

/// Wall-clock cap of one call, in call budgets (20 × 5 ms = 100 ms), unless [`WALL_CAP_FLOOR`]
/// is longer.
pub const WALL_CAP_FACTOR: u32 = 20;
/// Shortest wall-clock cap. A plugin cannot wait for anything (its host functions do not
/// block), so a call that takes long in wall time with CPU budget left was starved of a core;
/// on a two-core machine under heavy load a 2 ms call was seen taking 137 ms. Stopping it
/// would only throw its work away, so the cap is there for the pathological case alone.
pub const WALL_CAP_FLOOR: Duration = Duration::from_secs(1);

/// The wall-clock cap of a call with `budget` of CPU time.
pub fn wall_cap(budget: Duration) -> Duration {
    budget.saturating_mul(WALL_CAP_FACTOR).max(WALL_CAP_FLOOR)
}

/// Payload bytes one `plugins.call_deadline` of CPU time covers.
pub const BUDGET_BYTES: usize = 32 * 1024;

/// The CPU budget of a call on a `payload_len`-byte message: `deadline` per [`BUDGET_BYTES`]
/// begun (a 65-byte message gets one, a 128 KiB one four).
pub fn call_budget(deadline: Duration, payload_len: usize) -> Duration {
    let shares = u32::try_from(payload_len.div_ceil(BUDGET_BYTES).max(1)).unwrap_or(u32::MAX);
    deadline.saturating_mul(shares)
}

/// The calling thread's CPU time (user + system), if the clock can be read.
pub(super) fn thread_cpu_time() -> Option<Duration> {
    let t = nix::time::clock_gettime(nix::time::ClockId::CLOCK_THREAD_CPUTIME_ID).ok()?;
    Some(Duration::new(
        u64::try_from(t.tv_sec()).ok()?,
        u32::try_from(t.tv_nsec()).ok()?,
    ))
}

/// When a call began, by both clocks.
#[derive(Debug, Clone, Copy)]
pub(super) struct CallClock {
    wall: Instant,
    cpu: Option<Duration>,
}

impl CallClock {
    /// Start now, on the calling thread.
    pub(super) fn start() -> Self {
        Self {
            wall: Instant::now(),
            cpu: thread_cpu_time(),
        }
    }

    /// (CPU time, wall time) since the start. Must be read on the thread that started it.
    pub(super) fn used(&self) -> (Duration, Duration) {
        let wall = self.wall.elapsed();
        let cpu = match (self.cpu, thread_cpu_time()) {
            (Some(start), Some(now)) => now.saturating_sub(start),
            _ => wall,
        };
        (cpu, wall)
    }
}

/// What to do with a call whose epoch deadline has passed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Verdict {
    /// Keep running; look again after this many epoch ticks.
    Continue(u64),
    /// The CPU budget is spent: stop, and count it against the message's device.
    CpuSpent,
    /// The wall-clock cap is reached with CPU budget left: stop, count it against no one.
    WallCap,
}

/// Epoch ticks covering `d` (at least one).
pub(super) fn ticks(d: Duration, tick: Duration) -> u64 {
    let n = d.as_nanos().div_ceil(tick.as_nanos().max(1)).max(1);
    u64::try_from(n).unwrap_or(u64::MAX)
}

/// The decision for a call with `budget` of CPU time that has used `cpu` of it in `wall` of
/// wall time, with the epoch advancing every `tick`. The next look comes after the CPU budget
/// left (the earliest the budget can be spent, since a thread's CPU time grows no faster than
/// the wall clock) or at the wall-clock cap, whichever is sooner.
pub(super) fn verdict(budget: Duration, cpu: Duration, wall: Duration, tick: Duration) -> Verdict {
    if cpu >= budget {
        return Verdict::CpuSpent;
    }
    let cap = wall_cap(budget);
    if wall >= cap {
        return Verdict::WallCap;
    }
    Verdict::Continue(ticks(budget - cpu, tick).min(ticks(cap - wall, tick)))
}

/// Why a call was stopped (the error the epoch callback raises).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub(super) enum Stopped {
    /// See [`Verdict::CpuSpent`].
    #[error(
        "CPU budget spent: the call used {:.1} ms of CPU time in {:.1} ms (budget {}: plugins.call_deadline per {} KiB of payload)",
        ms(*cpu), ms(*wall), humantime::format_duration(*budget), BUDGET_BYTES / 1024
    )]
    CpuSpent {
        /// CPU time used.
        cpu: Duration,
        /// Wall time taken.
        wall: Duration,
        /// The budget.
        budget: Duration,
    },
    /// See [`Verdict::WallCap`].
    #[error(
        "wall-clock cap hit: the call ran {:.1} ms but got only {:.1} ms of CPU time; the gateway is overloaded (cap: {WALL_CAP_FACTOR} x plugins.call_deadline, at least {}); not counted against the device",
        ms(*wall), ms(*cpu), humantime::format_duration(WALL_CAP_FLOOR)
    )]
    WallCap {
        /// CPU time used.
        cpu: Duration,
        /// Wall time taken.
        wall: Duration,
    },
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn a_call_waiting_for_a_core_continues_for_the_cpu_budget_it_has_left() {
        // 5 ms budget, 1 ms of CPU in 6 ms of wall time: 4 ms of CPU left.
        assert_eq!(verdict(5 * MS, MS, 6 * MS, MS), Verdict::Continue(4));
        // A fraction of a tick left still means one more tick.
        assert_eq!(
            verdict(5 * MS, Duration::from_micros(4_900), 30 * MS, MS),
            Verdict::Continue(1)
        );
        // Nothing spent yet: the whole budget.
        assert_eq!(
            verdict(5 * MS, Duration::ZERO, 5 * MS, MS),
            Verdict::Continue(5)
        );
    }

    #[test]
    fn a_spent_cpu_budget_stops_the_call_whatever_the_wall_clock_says() {
        assert_eq!(verdict(5 * MS, 5 * MS, 5 * MS, MS), Verdict::CpuSpent);
        assert_eq!(verdict(5 * MS, 7 * MS, 8 * MS, MS), Verdict::CpuSpent);
        // Even past the wall-clock cap, spent CPU is the plugin's doing.
        assert_eq!(verdict(5 * MS, 5 * MS, 500 * MS, MS), Verdict::CpuSpent);
    }

    #[test]
    fn the_wall_clock_cap_stops_a_starved_call_and_is_never_overshot() {
        // 5 ms budget: the floor of 1 s applies.
        assert_eq!(wall_cap(5 * MS), WALL_CAP_FLOOR);
        assert_eq!(verdict(5 * MS, 2 * MS, 999 * MS, MS), Verdict::Continue(1));
        assert_eq!(verdict(5 * MS, 2 * MS, 1000 * MS, MS), Verdict::WallCap);
        assert_eq!(verdict(5 * MS, 2 * MS, 2500 * MS, MS), Verdict::WallCap);
        // 200 ms budget: 20 x 200 ms = 4 s. 2 ms before the cap with 100 ms of CPU left: look
        // again at the cap.
        assert_eq!(wall_cap(200 * MS), 4000 * MS);
        assert_eq!(
            verdict(200 * MS, 100 * MS, 3998 * MS, MS),
            Verdict::Continue(2)
        );
        assert_eq!(verdict(200 * MS, 100 * MS, 4000 * MS, MS), Verdict::WallCap);
    }

    #[test]
    fn the_budget_grows_with_the_payload() {
        assert_eq!(call_budget(5 * MS, 0), 5 * MS);
        assert_eq!(call_budget(5 * MS, 65), 5 * MS);
        assert_eq!(call_budget(5 * MS, BUDGET_BYTES), 5 * MS);
        assert_eq!(call_budget(5 * MS, BUDGET_BYTES + 1), 10 * MS);
        assert_eq!(call_budget(5 * MS, 128 * 1024), 20 * MS);
        assert_eq!(call_budget(5 * MS, 128 * 1024 - 20), 20 * MS);
    }

    #[test]
    fn ticks_round_up_and_never_reach_zero() {
        assert_eq!(ticks(Duration::ZERO, MS), 1);
        assert_eq!(ticks(Duration::from_micros(1), MS), 1);
        assert_eq!(ticks(MS, MS), 1);
        assert_eq!(ticks(Duration::from_micros(1_001), MS), 2);
        assert_eq!(ticks(Duration::from_secs(10), MS), 10_000);
    }

    #[test]
    fn the_thread_cpu_clock_counts_work_and_not_sleep() {
        let clock = CallClock::start();
        std::thread::sleep(20 * MS);
        let (cpu, wall) = clock.used();
        assert!(wall >= 20 * MS);
        assert!(cpu < wall, "sleeping costs no CPU: {cpu:?} of {wall:?}");
        assert!(
            thread_cpu_time().is_some(),
            "the clock is readable on Linux"
        );
    }
}
