//! The index `ListRuns` answers from: every stored run's summary, kept in
//! this replica's memory, newest first.
//!
//! It is fed by two watches started with the broker (see
//! `server::tasks::index_runs`): the runs bucket (each run's record, with
//! its history at start: status, owner, pipeline, times) and the events
//! stream's `handoff_accepted`, `handoff_redriven`, `dead_lettered` and
//! `intent_drift` events
//! (the agents that took part, dead letters, drift), and `run_purged`
//! (a purged run leaves the index: its record is purged from the stream
//! without a delete marker). A listing never reads the store: it walks
//! the runs in order, skipping those that do not match, until its page is
//! full, so a page costs the same whatever the number of runs stored,
//! unless the filter matches few of them.
//!
//! What it costs: per stored run, the fields filters read and its record
//! encoded without its pinned context and result; the bench measures
//! about 600 bytes of handoffd's memory per run.

use std::{
    collections::{BTreeSet, HashMap},
    sync::{Arc, RwLock},
};

use handoff_proto::pb;

/// The most runs a page holds.
pub const MAX_PAGE: usize = 500;

/// Runs a page holds unless asked otherwise.
pub const DEFAULT_PAGE: usize = 50;

/// Where a run sorts: newest start first, then by id.
type Position = (std::cmp::Reverse<i128>, String);

/// What the index keeps of a run: the fields a filter reads, and the
/// run's record (pinned context and result left out) encoded, decoded
/// only when listed.
#[derive(Debug, Clone, Default)]
struct Entry {
    /// Set once the run's record was read.
    record: Option<Record>,
    /// The runs bucket's revision of that record.
    revision: u64,
    agents: Vec<Box<str>>,
    dead_letters: u32,
    drift: bool,
    /// The run's id, shared with `Inner::handoffs`.
    id: Option<Arc<str>>,
    /// Its handoffs (by [`handoff_key`]), to forget them with it.
    handoffs: Vec<u64>,
}

/// The key of a handoff id in [`Inner::handoffs`].
fn handoff_key(handoff_id: &str) -> u64 {
    use std::hash::{Hash as _, Hasher as _};
    let mut hasher = std::hash::DefaultHasher::new();
    handoff_id.hash(&mut hasher);
    hasher.finish()
}

#[derive(Debug, Clone)]
struct Record {
    owner: Box<str>,
    status: i32,
    /// Empty: `default`.
    pipeline: Box<str>,
    /// The run it was forked from; empty: none.
    parent: Box<str>,
    created: i128,
    ended: Option<i128>,
    encoded: Box<[u8]>,
}

impl Record {
    fn position(&self, id: &str) -> Position {
        (std::cmp::Reverse(self.created), id.to_string())
    }
}

#[derive(Default)]
struct Inner {
    entries: HashMap<String, Entry>,
    order: BTreeSet<Position>,
    /// The run of each accepted handoff (by a hash of its id: a handoff
    /// found this way is looked for in that run's timeline, which settles
    /// a collision).
    handoffs: HashMap<u64, Arc<str>>,
    /// Runs purged lately, so that their record, still read by a watch
    /// that lags, does not come back.
    purged: std::collections::HashSet<String>,
    purged_order: std::collections::VecDeque<String>,
}

/// How many purged run ids the index remembers.
const PURGED_KEPT: usize = 65_536;

/// The runs this replica knows, for `ListRuns`.
#[derive(Default)]
pub struct RunIndex {
    inner: RwLock<Inner>,
    /// Whether the runs bucket's history, and the events stream up to
    /// when the index started, were read.
    ready: tokio::sync::watch::Sender<(bool, bool)>,
}

/// Which runs a listing wants (a `ListRunsRequest`, checked).
#[derive(Debug, Clone, Default)]
pub struct Filter {
    /// Exact owner.
    pub owner: Option<String>,
    /// Any of these statuses.
    pub statuses: Vec<i32>,
    /// Exact pipeline (`default` matches runs without one).
    pub pipeline: Option<String>,
    /// An agent a handoff of the run was accepted for.
    pub agent: Option<String>,
    /// Started in `[after, before)`, as nanoseconds since the epoch.
    pub started: (Option<i128>, Option<i128>),
    /// Ended in `[after, before)`.
    pub ended: (Option<i128>, Option<i128>),
    /// Has a dead letter.
    pub dead_letters: bool,
    /// Drifted from its ask.
    pub drift: bool,
    /// Forked from this run.
    pub parent: Option<String>,
}

/// Nanoseconds since the epoch of a timestamp.
pub fn nanos(t: &prost_types::Timestamp) -> i128 {
    i128::from(t.seconds) * 1_000_000_000 + i128::from(t.nanos)
}

fn in_range(at: Option<i128>, (after, before): (Option<i128>, Option<i128>)) -> bool {
    if after.is_none() && before.is_none() {
        return true;
    }
    let Some(at) = at else { return false };
    after.is_none_or(|a| at >= a) && before.is_none_or(|b| at < b)
}

impl Filter {
    fn matches(&self, record: &Record, entry: &Entry) -> bool {
        let pipeline = if record.pipeline.is_empty() {
            "default"
        } else {
            &record.pipeline
        };
        self.owner.as_deref().is_none_or(|o| o == &*record.owner)
            && (self.statuses.is_empty() || self.statuses.contains(&record.status))
            && self.pipeline.as_deref().is_none_or(|p| p == pipeline)
            && self
                .agent
                .as_deref()
                .is_none_or(|a| entry.agents.iter().any(|x| &**x == a))
            && in_range(Some(record.created), self.started)
            && in_range(record.ended, self.ended)
            && (!self.dead_letters || entry.dead_letters > 0)
            && (!self.drift || entry.drift)
            && self.parent.as_deref().is_none_or(|p| p == &*record.parent)
    }
}

/// A page token: where the previous page stopped.
fn page_token((std::cmp::Reverse(at), id): &Position) -> String {
    format!("{at}/{id}")
}

/// The position a page token names; `None` if it is not one.
fn parse_token(token: &str) -> Option<Position> {
    let (at, id) = token.split_once('/')?;
    Some((std::cmp::Reverse(at.parse().ok()?), id.to_string()))
}

/// A page token this index did not give.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BadToken;

/// What a listing found.
#[derive(Debug, Default)]
pub struct Page {
    /// The runs, newest first.
    pub runs: Vec<pb::RunSummary>,
    /// Where the next page starts; `None` on the last page.
    pub next: Option<String>,
    /// Where this page ended.
    last: Option<Position>,
}

impl RunIndex {
    /// Records a run's record as stored at `revision` (an older revision
    /// than the one known is ignored).
    pub fn put(&self, mut run: pb::Run, revision: u64) {
        use prost::Message as _;
        run.pinned = None;
        run.result = None;
        run.result_ref = None;
        for w in &mut run.waiting {
            w.payload = None;
            w.answer_payload = None;
        }
        let record = Record {
            owner: run.owner.as_str().into(),
            status: run.status,
            pipeline: run.pipeline.as_str().into(),
            parent: run.parent_run_id.as_str().into(),
            created: run.created_at.as_ref().map_or(0, nanos),
            ended: run.ended_at.as_ref().map(nanos),
            encoded: run.encode_to_vec().into_boxed_slice(),
        };
        let Ok(mut inner) = self.inner.write() else {
            return;
        };
        let inner = &mut *inner;
        if inner.purged.contains(&run.id) {
            return;
        }
        let entry = inner.entries.entry(run.id.clone()).or_default();
        if revision < entry.revision {
            return;
        }
        entry.revision = revision;
        if let Some(old) = entry.record.take() {
            inner.order.remove(&old.position(&run.id));
        }
        inner.order.insert(record.position(&run.id));
        entry.record = Some(record);
    }

    /// Forgets a run (purged).
    pub fn remove(&self, run_id: &str) {
        let Ok(mut inner) = self.inner.write() else {
            return;
        };
        if inner.purged.insert(run_id.to_string()) {
            inner.purged_order.push_back(run_id.to_string());
            if inner.purged_order.len() > PURGED_KEPT {
                if let Some(old) = inner.purged_order.pop_front() {
                    inner.purged.remove(&old);
                }
            }
        }
        if let Some(entry) = inner.entries.remove(run_id) {
            if let Some(record) = entry.record {
                inner.order.remove(&record.position(run_id));
            }
            for key in entry.handoffs {
                inner.handoffs.remove(&key);
            }
        }
    }

    /// Records what an event says about its run: an agent that took part,
    /// a dead letter, drift.
    pub fn event(&self, event: &pb::Event) {
        let kind = pb::EventKind::try_from(event.kind).unwrap_or(pb::EventKind::Unspecified);
        if !matches!(
            kind,
            pb::EventKind::HandoffAccepted
                | pb::EventKind::HandoffRedriven
                | pb::EventKind::DeadLettered
                | pb::EventKind::IntentDrift
                | pb::EventKind::RunPurged
        ) || event.run_id.is_empty()
            || event.run_id == "_"
        {
            return;
        }
        if kind == pb::EventKind::RunPurged {
            self.remove(&event.run_id);
            return;
        }
        let Ok(mut inner) = self.inner.write() else {
            return;
        };
        let inner = &mut *inner;
        let entry = inner.entries.entry(event.run_id.clone()).or_default();
        match kind {
            pb::EventKind::HandoffAccepted | pb::EventKind::HandoffRedriven => {
                let key = handoff_key(&event.handoff_id);
                let run = entry
                    .id
                    .get_or_insert_with(|| event.run_id.as_str().into())
                    .clone();
                if inner.handoffs.insert(key, run).is_none() {
                    entry.handoffs.push(key);
                }
                if !event.agent.is_empty() && !entry.agents.iter().any(|a| **a == *event.agent) {
                    entry.agents.push(event.agent.as_str().into());
                }
            }
            pb::EventKind::DeadLettered => entry.dead_letters += 1,
            _ => entry.drift = true,
        }
    }

    /// The run of handoff `handoff_id`, if a `handoff_accepted` event of
    /// it was seen (a hash of the id names it: check that the run's
    /// timeline has the handoff).
    pub fn run_of(&self, handoff_id: &str) -> Option<String> {
        let inner = self.inner.read().ok()?;
        inner
            .handoffs
            .get(&handoff_key(handoff_id))
            .map(|r| r.to_string())
    }

    /// Marks the runs bucket's history as read.
    pub fn loaded(&self) {
        self.ready.send_modify(|r| r.0 = true);
    }

    /// Marks the events stream as read up to when the index started.
    pub fn events_loaded(&self) {
        self.ready.send_modify(|r| r.1 = true);
    }

    /// Waits until both were read: listings answer from then on.
    pub async fn ready(&self) {
        let mut ready = self.ready.subscribe();
        let _ = ready.wait_for(|(runs, events)| *runs && *events).await;
    }

    /// How many runs it knows.
    pub fn len(&self) -> usize {
        self.inner.read().map_or(0, |i| i.order.len())
    }

    /// True when it knows no run.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Up to `size` runs matching `filter` whose owner `visible` lets the
    /// caller see, after the position `token` names (`None`: from the newest).
    /// [`BadToken`] if the token is not one this index gave.
    pub fn list(
        &self,
        filter: &Filter,
        visible: impl Fn(&str) -> bool,
        size: usize,
        token: Option<&str>,
    ) -> Result<Page, BadToken> {
        use std::ops::Bound;
        let start = match token {
            Some(t) => Bound::Excluded(parse_token(t).ok_or(BadToken)?),
            None => Bound::Unbounded,
        };
        let Ok(inner) = self.inner.read() else {
            return Ok(Page::default());
        };
        use prost::Message as _;
        let mut page = Page::default();
        for pos in inner.order.range((start, Bound::Unbounded)) {
            let Some(entry) = inner.entries.get(&pos.1) else {
                continue;
            };
            let Some(record) = &entry.record else {
                continue;
            };
            if !filter.matches(record, entry) || !visible(&record.owner) {
                continue;
            }
            let Ok(run) = pb::Run::decode(&*record.encoded) else {
                continue;
            };
            if page.runs.len() == size {
                page.next = page.last.as_ref().map(page_token);
                break;
            }
            page.last = Some(pos.clone());
            page.runs.push(pb::RunSummary {
                run: Some(run),
                agents: entry.agents.iter().map(|a| a.to_string()).collect(),
                dead_letters: entry.dead_letters,
                drift: entry.drift,
            });
        }
        Ok(page)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(id: &str, owner: &str, at: i64, status: pb::RunStatus) -> pb::Run {
        pb::Run {
            id: id.to_string(),
            owner: owner.to_string(),
            status: status as i32,
            created_at: Some(prost_types::Timestamp {
                seconds: at,
                nanos: 0,
            }),
            pinned: Some(pb::PinnedContext {
                ask: "kept out".to_string(),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    fn ids(page: &Page) -> Vec<String> {
        page.runs
            .iter()
            .filter_map(|s| s.run.as_ref().map(|r| r.id.clone()))
            .collect()
    }

    #[test]
    fn pages_walk_newest_first_without_repeats_or_gaps() {
        let index = RunIndex::default();
        for i in 0..25 {
            let status = if i % 2 == 0 {
                pb::RunStatus::Running
            } else {
                pb::RunStatus::Completed
            };
            // Two runs per second, so ties are broken by id.
            index.put(run(&format!("r{i:02}"), "ann", 1000 + i / 2, status), 1);
        }
        let all = Filter::default();
        let mut seen = Vec::new();
        let mut token = None;
        loop {
            let page = index.list(&all, |_| true, 10, token.as_deref()).unwrap();
            seen.extend(ids(&page));
            match page.next {
                Some(t) => token = Some(t),
                None => break,
            }
        }
        let mut expected: Vec<(i64, String)> = (0..25)
            .map(|i| (1000 + i / 2, format!("r{i:02}")))
            .collect();
        expected.sort_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)));
        let expected: Vec<String> = expected.into_iter().map(|(_, id)| id).collect();
        assert_eq!(seen, expected);
        let page = index.list(&all, |_| true, 5, None).unwrap();
        assert!(page.runs[0].run.as_ref().unwrap().pinned.is_none());
    }

    #[test]
    fn a_page_exactly_full_at_the_end_has_no_next() {
        let index = RunIndex::default();
        for i in 0..10 {
            index.put(run(&format!("r{i}"), "ann", i, pb::RunStatus::Running), 1);
        }
        let page = index.list(&Filter::default(), |_| true, 10, None).unwrap();
        assert_eq!(page.runs.len(), 10);
        assert!(page.next.is_none());
    }

    #[test]
    fn filters_and_visibility_apply_before_the_page_is_counted() {
        let index = RunIndex::default();
        for i in 0..20 {
            let owner = if i % 4 == 0 { "bob" } else { "ann" };
            index.put(
                run(&format!("r{i:02}"), owner, i, pb::RunStatus::Running),
                1,
            );
        }
        let bob = Filter {
            owner: Some("bob".to_string()),
            ..Default::default()
        };
        let page = index.list(&bob, |_| true, 3, None).unwrap();
        assert_eq!(ids(&page), ["r16", "r12", "r08"]);
        let next = index.list(&bob, |_| true, 3, page.next.as_deref()).unwrap();
        assert_eq!(ids(&next), ["r04", "r00"]);
        assert!(next.next.is_none());
        let hidden = index
            .list(&Filter::default(), |owner| owner == "bob", 50, None)
            .unwrap();
        assert_eq!(hidden.runs.len(), 5);
        assert!(index.list(&bob, |_| true, 3, Some("nonsense")).is_err());
    }

    #[test]
    fn a_later_revision_moves_a_run_and_an_older_one_is_ignored() {
        let index = RunIndex::default();
        index.put(run("a", "ann", 1, pb::RunStatus::Running), 5);
        index.put(run("a", "ann", 1, pb::RunStatus::Completed), 7);
        index.put(run("a", "ann", 1, pb::RunStatus::Running), 6);
        let done = Filter {
            statuses: vec![pb::RunStatus::Completed as i32],
            ..Default::default()
        };
        assert_eq!(ids(&index.list(&done, |_| true, 5, None).unwrap()), ["a"]);
        assert_eq!(index.len(), 1);
        index.remove("a");
        assert!(index.is_empty());
    }

    #[test]
    fn events_name_agents_dead_letters_and_drift() {
        let index = RunIndex::default();
        let event = |kind: pb::EventKind, agent: &str| pb::Event {
            kind: kind as i32,
            run_id: "a".to_string(),
            agent: agent.to_string(),
            ..Default::default()
        };
        // An event may come before the run's record.
        index.event(&event(pb::EventKind::HandoffAccepted, "writer"));
        index.put(run("a", "ann", 1, pb::RunStatus::Running), 1);
        index.put(run("b", "ann", 2, pb::RunStatus::Running), 1);
        index.event(&event(pb::EventKind::HandoffAccepted, "writer"));
        index.event(&event(pb::EventKind::HandoffAccepted, "editor"));
        index.event(&event(pb::EventKind::DeadLettered, "editor"));
        index.event(&event(pb::EventKind::Delivered, "other"));
        let writer = Filter {
            agent: Some("writer".to_string()),
            ..Default::default()
        };
        let page = index.list(&writer, |_| true, 5, None).unwrap();
        assert_eq!(ids(&page), ["a"]);
        assert_eq!(page.runs[0].agents, ["writer", "editor"]);
        assert_eq!(page.runs[0].dead_letters, 1);
        let dead = Filter {
            dead_letters: true,
            ..Default::default()
        };
        assert_eq!(ids(&index.list(&dead, |_| true, 5, None).unwrap()), ["a"]);
        let drift = Filter {
            drift: true,
            ..Default::default()
        };
        assert!(index
            .list(&drift, |_| true, 5, None)
            .unwrap()
            .runs
            .is_empty());
        index.event(&event(pb::EventKind::IntentDrift, ""));
        assert_eq!(ids(&index.list(&drift, |_| true, 5, None).unwrap()), ["a"]);
        // Handoffs lead to their run until it is purged.
        let accepted = pb::Event {
            handoff_id: "h1".to_string(),
            ..event(pb::EventKind::HandoffAccepted, "writer")
        };
        index.event(&accepted);
        assert_eq!(index.run_of("h1").as_deref(), Some("a"));
        assert_eq!(index.run_of("h2"), None);
        index.event(&pb::Event {
            kind: pb::EventKind::RunPurged as i32,
            run_id: "a".to_string(),
            ..Default::default()
        });
        assert_eq!(index.run_of("h1"), None);
        // A lagging watch's record of the purged run does not bring it back.
        index.put(run("a", "ann", 1, pb::RunStatus::Completed), 9);
        assert_eq!(
            ids(&index.list(&Filter::default(), |_| true, 5, None).unwrap()),
            ["b"]
        );
    }

    #[test]
    fn time_ranges_are_half_open_and_running_runs_have_not_ended() {
        let index = RunIndex::default();
        for i in 0..5 {
            let mut r = run(&format!("r{i}"), "ann", 10 * i, pb::RunStatus::Completed);
            r.ended_at = Some(prost_types::Timestamp {
                seconds: 10 * i + 5,
                nanos: 0,
            });
            index.put(r, 1);
        }
        index.put(run("live", "ann", 100, pb::RunStatus::Running), 1);
        let s = |x: i64| Some(i128::from(x) * 1_000_000_000);
        let started = Filter {
            started: (s(10), s(30)),
            ..Default::default()
        };
        assert_eq!(
            ids(&index.list(&started, |_| true, 9, None).unwrap()),
            ["r2", "r1"]
        );
        let ended = Filter {
            ended: (s(25), None),
            ..Default::default()
        };
        assert_eq!(
            ids(&index.list(&ended, |_| true, 9, None).unwrap()),
            ["r4", "r3", "r2"]
        );
    }
}
