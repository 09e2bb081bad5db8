//! Causal positions of events: a hybrid logical clock in nanoseconds
//! since the Unix epoch. Each position this replica hands out is greater
//! than every one it handed out before and than the floor it is given
//! (the position of what caused the event, plus one), and otherwise
//! follows the wall clock. A step that reads what another step wrote
//! (a delivery of a stored handoff, the release of arrived branches)
//! takes its floor from what it read, so its events follow their cause
//! whichever replica made it and however the stream stored them.

use std::{
    sync::atomic::{AtomicU64, Ordering},
    time::{SystemTime, UNIX_EPOCH},
};

use handoff_proto::pb;

/// Hands out positions; one per broker.
#[derive(Debug, Default)]
pub struct Clock {
    last: AtomicU64,
}

impl Clock {
    /// A position greater than every earlier one from this clock and not
    /// less than `floor`.
    pub fn after(&self, floor: u64) -> u64 {
        let now = wall();
        // A floor from a replica whose clock runs far ahead moves this
        // clock (and every one that reads what it stamps) at most
        // MAX_AHEAD past the wall clock.
        let bound = now.saturating_add(MAX_AHEAD);
        let floor = if floor > bound {
            tracing::warn!(
                ahead_ms = (floor - now) / 1_000_000,
                "a causal position read from the store is far ahead of this clock: is a replica's clock wrong?"
            );
            bound
        } else {
            floor
        };
        let mut last = self.last.load(Ordering::Relaxed);
        loop {
            let next = now.max(floor).max(last.saturating_add(1));
            match self
                .last
                .compare_exchange_weak(last, next, Ordering::AcqRel, Ordering::Relaxed)
            {
                Ok(_) => return next,
                Err(seen) => last = seen,
            }
        }
    }
}

/// How far past its wall clock a floor can move the clock.
pub const MAX_AHEAD: u64 = 60_000_000_000;

/// Nanoseconds since the Unix epoch now (0 before it).
fn wall() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
}

/// A timestamp as nanoseconds since the Unix epoch (0 for one before it).
pub fn nanos(t: Option<&prost_types::Timestamp>) -> u64 {
    let Some(t) = t else { return 0 };
    let (Ok(secs), Ok(ns)) = (u64::try_from(t.seconds), u64::try_from(t.nanos)) else {
        return 0;
    };
    secs.saturating_mul(1_000_000_000).saturating_add(ns)
}

/// Nanoseconds since the Unix epoch as a timestamp.
pub fn timestamp(nanos: u64) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: i64::try_from(nanos / 1_000_000_000).unwrap_or(i64::MAX),
        // Below 10^9, so it fits.
        nanos: i32::try_from(nanos % 1_000_000_000).unwrap_or(0),
    }
}

/// The order of a timeline: by position, events stored before positions
/// existed by their time, ties by stream sequence.
pub fn order_key(e: &pb::Event) -> (u64, u64) {
    let position = if e.position == 0 {
        nanos(e.at.as_ref())
    } else {
        e.position
    };
    (position, e.sequence)
}

/// Puts a timeline in causal order.
pub fn sort_timeline(events: &mut [pb::Event]) {
    events.sort_by_key(order_key);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn positions_rise_and_respect_their_floor() {
        let clock = Clock::default();
        let a = clock.after(0);
        let b = clock.after(0);
        assert!(b > a);
        let ahead = a + 10_000_000_000;
        assert_eq!(clock.after(ahead), ahead);
        assert_eq!(clock.after(0), ahead + 1);
    }

    #[test]
    fn a_floor_far_ahead_moves_the_clock_at_most_max_ahead() {
        let clock = Clock::default();
        let a = clock.after(0);
        let far = a + 3_600_000_000_000;
        let moved = clock.after(far);
        assert!(moved < far && moved > a + MAX_AHEAD / 2, "{moved} {a}");
        assert!(moved <= wall() + MAX_AHEAD);
    }

    #[test]
    fn timestamps_round_trip() {
        let t = timestamp(1_700_000_000_123_456_789);
        assert_eq!(nanos(Some(&t)), 1_700_000_000_123_456_789);
        assert_eq!(nanos(None), 0);
        let before_epoch = prost_types::Timestamp {
            seconds: -1,
            nanos: 0,
        };
        assert_eq!(nanos(Some(&before_epoch)), 0);
    }

    #[test]
    fn a_timeline_follows_positions_not_sequences() {
        let e = |sequence, position| pb::Event {
            sequence,
            position,
            ..Default::default()
        };
        let mut t = vec![e(1, 30), e(2, 10), e(3, 20)];
        sort_timeline(&mut t);
        let order: Vec<u64> = t.iter().map(|e| e.sequence).collect();
        assert_eq!(order, [2, 3, 1]);
    }
}
