//! Reading what happened: `Watch` (events as they are stored, resumable)
//! and `ListDeadLetters`.

use std::{collections::BTreeMap, time::Duration};

use futures::{stream::BoxStream, StreamExt};
use handoff_proto::pb;
use tokio::{sync::mpsc, time::Instant};

use crate::{
    app::{
        access,
        auth::{self, Caller},
        clock, Broker,
    },
    error::BrokerError,
    rules::{grants::Action, names, watch},
};

/// A watch: its events, and what its caller must go on being allowed for
/// it to stay open.
pub type Watching = (
    BoxStream<'static, Result<pb::Event, BrokerError>>,
    auth::Standing,
);

/// The events a watch asks for, from `from_sequence` on (0: new events
/// only). The store's reader is created before this returns, so nothing
/// stored after `Watch` answers is missed.
pub async fn watch(
    broker: &Broker,
    caller: &Caller,
    req: pb::WatchRequest,
) -> Result<Watching, BrokerError> {
    let narrowed = watch::narrow(&req)?;
    // Who may: a reader watches anything; an owner watches its own runs
    // (a watch of one run, or of one owner's runs).
    let mut standing = auth::Standing::Watch(None);
    if !caller.may(Action::Read, "") {
        let owner = if req.run_id.is_empty() {
            req.owner.clone()
        } else {
            access::read(broker, caller, &req.run_id, "").await?.owner
        };
        if owner.is_empty() || (!req.owner.is_empty() && req.owner != owner) {
            auth::require(broker, caller, Action::Read, "").await?;
        }
        auth::require(broker, caller, Action::Own, &owner).await?;
        standing = auth::Standing::Watch(Some(owner));
    }
    let events = broker
        .store()
        .watch_events(narrowed.run_id.as_deref(), narrowed.kind, req.from_sequence)
        .await?;
    let one_run = narrowed.run_id.is_some();
    let events = events
        .filter(move |e| {
            let keep = match e {
                Ok(e) => watch::matches(&req, e),
                Err(_) => true,
            };
            std::future::ready(keep)
        })
        .map(|e| {
            e.map(|mut e| {
                e.resume_sequence = e.sequence.saturating_add(1);
                e
            })
        })
        .boxed();
    let events = if one_run { causal(events) } else { events };
    Ok((events, standing))
}

/// An event about to be given, with where to resume: the lowest sequence
/// not given yet (one still held, else the next not read).
fn resumable(
    mut e: pb::Event,
    held: &BTreeMap<(u64, u64), (Instant, pb::Event)>,
    read: u64,
) -> pb::Event {
    e.resume_sequence = held
        .keys()
        .map(|(_, sequence)| *sequence)
        .chain([read.saturating_add(1)])
        .min()
        .unwrap_or(0);
    e
}

/// How long a watch of one run holds an event back for the events that
/// caused it to be stored (they can be stored after it).
pub const HOLD: Duration = Duration::from_millis(50);

/// Gives a run's events in causal order (by [`clock::order_key`]): each
/// is held for [`HOLD`] after it is read, and the held ones go out
/// lowest position first. A cause stored more than [`HOLD`] after its
/// effect still comes after it; every event carries its position.
pub fn causal(
    mut events: BoxStream<'static, Result<pb::Event, BrokerError>>,
) -> BoxStream<'static, Result<pb::Event, BrokerError>> {
    let (tx, rx) = mpsc::channel::<Result<pb::Event, BrokerError>>(256);
    tokio::spawn(async move {
        let mut held: BTreeMap<(u64, u64), (Instant, pb::Event)> = BTreeMap::new();
        let mut open = true;
        // The highest sequence read: every lower one is given or held.
        let mut read = 0u64;
        while open || !held.is_empty() {
            let due = held.first_key_value().map(|(_, (due, _))| *due);
            tokio::select! {
                next = events.next(), if open => match next {
                    Some(Ok(e)) => {
                        read = read.max(e.sequence);
                        held.insert(clock::order_key(&e), (Instant::now() + HOLD, e));
                    }
                    Some(Err(err)) => {
                        // Everything held goes out before the error ends it.
                        while let Some((_, (_, e))) = held.pop_first() {
                            let e = resumable(e, &held, read);
                            if tx.send(Ok(e)).await.is_err() {
                                return;
                            }
                        }
                        let _ = tx.send(Err(err)).await;
                        return;
                    }
                    None => open = false,
                },
                () = async {
                    match due {
                        Some(due) => tokio::time::sleep_until(due).await,
                        None => std::future::pending().await,
                    }
                } => {}
                () = tx.closed() => return,
            }
            let now = Instant::now();
            while let Some(entry) = held.first_entry() {
                if open && entry.get().0 > now {
                    break;
                }
                let (_, e) = entry.remove();
                let e = resumable(e, &held, read);
                if tx.send(Ok(e)).await.is_err() {
                    return;
                }
            }
        }
    });
    futures::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|item| (item, rx))
    })
    .boxed()
}

/// The token of an event kind (`handoff_accepted`, ...).
pub fn kind_token(kind: i32) -> &'static str {
    pb::EventKind::try_from(kind).map_or("unknown", |k| k.token())
}

/// Dead letters, oldest first.
pub async fn dead_letters(
    broker: &Broker,
    caller: &Caller,
    req: pb::ListDeadLettersRequest,
) -> Result<pb::ListDeadLettersResponse, BrokerError> {
    auth::require(broker, caller, Action::Read, "").await?;
    names::validate_optional("agent", &req.agent)?;
    let agent = (!req.agent.is_empty()).then_some(req.agent.as_str());
    let limit = match req.limit {
        0 => 100,
        n => n.min(10_000) as usize,
    };
    Ok(pb::ListDeadLettersResponse {
        dead_letters: broker.store().dead_letters(agent, limit).await?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(sequence: u64, position: u64) -> Result<pb::Event, BrokerError> {
        Ok(pb::Event {
            sequence,
            position,
            ..Default::default()
        })
    }

    async fn sequences(events: BoxStream<'static, Result<pb::Event, BrokerError>>) -> Vec<u64> {
        causal(events)
            .map(|e| e.map(|e| e.sequence).unwrap_or(0))
            .collect()
            .await
    }

    #[tokio::test]
    async fn a_run_watch_gives_events_read_together_in_causal_order() {
        // Stored effect first (sequence 1), cause after (sequence 2).
        let stored = futures::stream::iter([event(1, 20), event(2, 10), event(3, 30)]).boxed();
        assert_eq!(sequences(stored).await, [2, 1, 3]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_cause_stored_after_the_hold_comes_after_its_effect() {
        let late = futures::stream::iter([event(1, 20)])
            .chain(
                futures::stream::once(async {
                    tokio::time::sleep(HOLD * 3).await;
                    event(2, 10)
                })
                .boxed(),
            )
            .boxed();
        assert_eq!(sequences(late).await, [1, 2]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_cause_stored_within_the_hold_still_comes_first() {
        let soon = futures::stream::iter([event(1, 20)])
            .chain(
                futures::stream::once(async {
                    tokio::time::sleep(HOLD / 2).await;
                    event(2, 10)
                })
                .boxed(),
            )
            .boxed();
        assert_eq!(sequences(soon).await, [2, 1]);
    }

    #[tokio::test]
    async fn each_event_says_where_to_resume_without_a_gap() {
        let stored = futures::stream::iter([event(1, 20), event(2, 10), event(3, 30)]).boxed();
        let given: Vec<(u64, u64)> = causal(stored)
            .map(|e| {
                e.map(|e| (e.sequence, e.resume_sequence))
                    .unwrap_or_default()
            })
            .collect()
            .await;
        // Sequence 2 first: 1 is still to come, so resume from 1.
        assert_eq!(given, [(2, 1), (1, 3), (3, 4)]);
    }

    #[tokio::test]
    async fn an_error_ends_the_watch_after_what_was_held() {
        let failing =
            futures::stream::iter([event(1, 20), Err(BrokerError::Unavailable("gone".into()))])
                .boxed();
        let out: Vec<bool> = causal(failing).map(|e| e.is_ok()).collect().await;
        assert_eq!(out, [true, false]);
    }
}
