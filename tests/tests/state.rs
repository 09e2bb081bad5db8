//! Shared run state and the handoff signals: deltas applied once with their
//! handoff, conflicts on a stale base, merge policies, pinned keys, `reads`,
//! every past revision; dropped fields and `carry`; re-asks answered from
//! state; the judge's score; handoffs per resolved run.

use std::{collections::BTreeSet, time::Duration};

use handoff_client::{
    pb, state, AgentConfig, Client, ContractSpec, ErrorKind, Handoff, RunConfig, StateDelta,
};
use handoff_tests::{
    agent_and_run, compile_proto, count, inbox, keep_inboxes, next_within, note, scrape_parsed,
    stack, timeline_when,
};

const WAIT: Duration = Duration::from_secs(10);

fn s(v: &str) -> state::Value {
    v.into()
}

async fn value(client: &Client, run: &str, revision: u64, key: &str) -> Option<state::Value> {
    let resp = client.get_state(run, revision).await.expect("get state");
    resp.state.and_then(|st| st.values.get(key).cloned())
}

/// Registers `agent` (taking any payload) and starts a run as `config` says.
async fn revision(client: &Client, run: &str) -> u64 {
    client
        .get_state(run, 0)
        .await
        .expect("get state")
        .state
        .map_or(0, |st| st.revision)
}

#[tokio::test]
async fn a_delta_is_applied_once_with_its_handoff_and_not_at_all_when_refused() {
    let (_nats, _broker, client) = stack(|_| {}).await;
    let run = agent_and_run(
        &client,
        "worker",
        RunConfig::new("olga").max_depth(1).state("city", "Oslo"),
    )
    .await;
    assert_eq!(revision(&client, &run.id).await, 1);

    // Applied with its handoff; a retry (same idempotency key) applies
    // nothing more.
    let send = || {
        Handoff::to(&run.id, "worker", &note("book", 1))
            .expect("handoff")
            .idempotency_key("k1")
            .state_delta(StateDelta::based_on(1).set("nights", 2.0))
    };
    let first = client.handoff(send()).await.expect("first");
    assert_eq!(first.state_revision, 2);
    let again = client.handoff(send()).await.expect("retry");
    assert!(again.duplicate);
    assert_eq!(again.state_revision, 2);
    assert_eq!(revision(&client, &run.id).await, 2);
    assert_eq!(value(&client, &run.id, 0, "nights").await, Some(2.0.into()));

    // Refused (over the run's depth cap): nothing changes.
    let mut sub = client
        .subscribe("worker", "w1", 1)
        .await
        .expect("subscribe");
    let d = next_within(&mut sub, WAIT).await.expect("delivery");
    assert_eq!(d.state_revision(), 2);
    assert_eq!(d.state_str("city"), Some("Oslo"));
    let err = d
        .handoff(
            Handoff::to(&run.id, "worker", &note("deeper", 2))
                .expect("handoff")
                .state_delta(d.state_delta().set("city", "Rome")),
        )
        .await
        .expect_err("over the depth cap");
    assert_eq!(err.reason(), Some("DEPTH_CAP"), "{err}");
    // A delta that breaks a rule of the state itself is refused whole: the
    // valid key in it is not applied either.
    let err = client
        .handoff(
            Handoff::to(&run.id, "worker", &note("big", 3))
                .expect("handoff")
                .state_delta(
                    StateDelta::new()
                        .set("ok", "fine")
                        .set("huge", "x".repeat(70 * 1024)),
                ),
        )
        .await
        .expect_err("over max_state_value_bytes");
    assert_eq!(err.kind(), ErrorKind::FailedPrecondition);
    assert_eq!(err.reason(), Some("STATE_TOO_LARGE"), "{err}");
    assert_eq!(err.metadata().get("key").map(String::as_str), Some("huge"));
    assert_eq!(revision(&client, &run.id).await, 2);
    assert_eq!(value(&client, &run.id, 0, "city").await, Some(s("Oslo")));
    assert_eq!(value(&client, &run.id, 0, "ok").await, None);
    // The timeline holds the one accepted handoff, with its change.
    let timeline = client.get_run(&run.id).await.expect("run").timeline;
    let accepted: Vec<_> = timeline
        .iter()
        .filter(|e| e.kind == pb::EventKind::HandoffAccepted as i32)
        .collect();
    assert_eq!(accepted.len(), 1);
    let change = accepted[0].state_change.clone().expect("state change");
    assert_eq!(change.revision, 2);
    assert_eq!(change.added, vec!["nights".to_string()]);
}

#[tokio::test]
async fn a_stale_base_on_one_key_loses_to_the_winner_and_disjoint_keys_both_apply() {
    let (_nats, _broker, client) = stack(|_| {}).await;
    let run = agent_and_run(
        &client,
        "worker",
        RunConfig::new("olga").state("city", "Oslo"),
    )
    .await;
    let send = |key: &str, value: &str, n: u32| {
        Handoff::to(&run.id, "worker", &note(value, n))
            .expect("handoff")
            .state_delta(StateDelta::based_on(1).set(key, value))
    };
    // The same key from the same base, at once: one wins.
    let (a, b) = tokio::join!(
        client.handoff(send("city", "Rome", 1)),
        client.handoff(send("city", "Lima", 2))
    );
    let (won, lost) = match (a, b) {
        (Ok(w), Err(l)) => (w, l),
        (Err(l), Ok(w)) => (w, l),
        other => panic!("exactly one must win: {other:?}"),
    };
    assert_eq!(won.state_revision, 2);
    assert_eq!(lost.kind(), ErrorKind::Conflict, "{lost}");
    assert_eq!(lost.code(), Some(tonic::Code::Aborted));
    assert_eq!(lost.reason(), Some("STATE_CONFLICT"));
    assert_eq!(
        lost.metadata().get("keys").map(String::as_str),
        Some("city")
    );
    assert_eq!(revision(&client, &run.id).await, 2);

    // Different keys from the same (now stale) base: both apply.
    let (a, b) = tokio::join!(
        client.handoff(send("date", "May", 3)),
        client.handoff(send("budget", "low", 4))
    );
    let revisions: BTreeSet<u64> = [a.expect("a").state_revision, b.expect("b").state_revision]
        .into_iter()
        .collect();
    assert_eq!(revisions, [3, 4].into_iter().collect());
    let latest = client.get_state(&run.id, 0).await.expect("state");
    let values = latest.state.expect("state").values;
    assert_eq!(values.get("date"), Some(&s("May")));
    assert_eq!(values.get("budget"), Some(&s("low")));
    assert!(matches!(
        values.get("city").and_then(state::as_str),
        Some("Rome" | "Lima")
    ));
    // The loser, read again and retried from the latest base, applies.
    let retried = client
        .handoff(
            Handoff::to(&run.id, "worker", &note("again", 5))
                .expect("handoff")
                .state_delta(StateDelta::based_on(latest.latest_revision).set("city", "Quito")),
        )
        .await
        .expect("retried");
    assert_eq!(retried.state_revision, 5);
}

#[tokio::test]
async fn append_and_merge_policies_combine_and_pinned_keys_never_change() {
    let (_nats, _broker, client) = stack(|_| {}).await;
    let run = agent_and_run(
        &client,
        "worker",
        RunConfig::new("olga")
            .pin_state("order_id", "A-1")
            .policy("notes", pb::MergePolicy::Append)
            .policy("profile", pb::MergePolicy::Merge),
    )
    .await;
    let send = |delta: StateDelta, n: u32| {
        Handoff::to(&run.id, "worker", &note("x", n))
            .expect("handoff")
            .state_delta(delta)
    };
    // Appends from the same base combine, in order.
    for (n, v) in ["one", "two"].iter().enumerate() {
        client
            .handoff(send(StateDelta::based_on(1).set("notes", *v), n as u32))
            .await
            .expect("append");
    }
    client
        .handoff(send(StateDelta::new().append("notes", [s("three")]), 7))
        .await
        .expect("explicit append");
    let notes = value(&client, &run.id, 0, "notes").await.expect("notes");
    let items: Vec<&str> = state::as_list(&notes)
        .expect("a list")
        .iter()
        .filter_map(state::as_str)
        .collect();
    assert_eq!(items, vec!["one", "two", "three"]);
    // Merges combine key by key.
    let fields = |k: &str, v: &str| {
        state::Value::from(std::collections::BTreeMap::from([(k.to_string(), s(v))]))
    };
    client
        .handoff(send(
            StateDelta::based_on(1).set("profile", fields("name", "Ann")),
            8,
        ))
        .await
        .expect("merge");
    client
        .handoff(send(
            StateDelta::based_on(1).merge("profile", [("city".to_string(), s("Oslo"))]),
            9,
        ))
        .await
        .expect("merge again");
    let profile = value(&client, &run.id, 0, "profile")
        .await
        .expect("profile");
    let keys: Vec<&String> = state::as_struct(&profile)
        .expect("a struct")
        .keys()
        .collect();
    assert_eq!(keys, vec!["city", "name"]);
    // An append to a key that holds no list is refused.
    let err = client
        .handoff(send(StateDelta::new().append("profile", [s("x")]), 10))
        .await
        .expect_err("not a list");
    assert_eq!(err.reason(), Some("STATE_TYPE_MISMATCH"), "{err}");

    // A pinned key: neither changed nor removed, and the run state keeps it.
    let before = revision(&client, &run.id).await;
    for delta in [
        StateDelta::new().set("order_id", "B-2"),
        StateDelta::new().unset("order_id"),
        StateDelta::new().append("order_id", [s("x")]),
    ] {
        let err = client.handoff(send(delta, 11)).await.expect_err("pinned");
        assert_eq!(err.kind(), ErrorKind::FailedPrecondition);
        assert_eq!(err.reason(), Some("PINNED_KEY"), "{err}");
        assert_eq!(
            err.metadata().get("keys").map(String::as_str),
            Some("order_id")
        );
    }
    assert_eq!(revision(&client, &run.id).await, before);
    assert_eq!(value(&client, &run.id, 0, "order_id").await, Some(s("A-1")));
}

#[tokio::test]
async fn reads_limits_what_a_delivery_carries_and_every_past_revision_is_kept() {
    let (_nats, _broker, client) = stack(|_| {}).await;
    client
        .register_agent(AgentConfig::new("narrow").reads(["city"]))
        .await
        .expect("agent");
    let run = agent_and_run(
        &client,
        "wide",
        RunConfig::new("olga")
            .ask("plan a trip")
            .pin_state("order_id", "A-1")
            .state("city", "Oslo")
            .state("card", "4111"),
    )
    .await;
    let mut receipts = Vec::new();
    for (n, (key, v)) in [
        ("nights", "2"),
        ("city", "Rome"),
        ("hotel", "H"),
        ("city", "Lima"),
    ]
    .into_iter()
    .enumerate()
    {
        let target = if n % 2 == 0 { "narrow" } else { "wide" };
        let receipt = client
            .handoff(
                Handoff::to(&run.id, target, &note(v, n as u32))
                    .expect("handoff")
                    .state_delta(StateDelta::new().set(key, v)),
            )
            .await
            .expect("handoff");
        receipts.push((receipt, key, v));
    }
    // Every revision: the seed, then one per delta, each with its handoff.
    let seed = client.get_state(&run.id, 1).await.expect("seed");
    assert_eq!(seed.handoff_id, "");
    assert_eq!(
        seed.state.expect("state").values.get("city"),
        Some(&s("Oslo"))
    );
    for (i, (receipt, key, v)) in receipts.iter().enumerate() {
        let rev = i as u64 + 2;
        assert_eq!(receipt.state_revision, rev);
        let at = client.get_state(&run.id, rev).await.expect("revision");
        assert_eq!(at.handoff_id, receipt.handoff_id);
        assert_eq!(at.latest_revision, 5);
        assert_eq!(at.state.expect("state").values.get(*key), Some(&s(v)));
    }
    assert_eq!(value(&client, &run.id, 3, "city").await, Some(s("Rome")));
    assert_eq!(value(&client, &run.id, 4, "city").await, Some(s("Rome")));
    assert_eq!(value(&client, &run.id, 5, "city").await, Some(s("Lima")));
    let err = client
        .get_state(&run.id, 6)
        .await
        .expect_err("no revision 6");
    assert_eq!(err.kind(), ErrorKind::NotFound);
    assert_eq!(err.reason(), Some("STATE_REVISION_NOT_FOUND"));

    // The narrow agent's deliveries carry the key it reads and the pinned
    // one; the wide one's carry everything, each at its handoff's revision.
    let mut narrow = client
        .subscribe("narrow", "n1", 2)
        .await
        .expect("subscribe");
    let mut seen = Vec::new();
    for _ in 0..2 {
        let d = next_within(&mut narrow, WAIT).await.expect("delivery");
        let keys: BTreeSet<String> = d.state().expect("state").values.keys().cloned().collect();
        assert_eq!(
            keys,
            ["city", "order_id"].map(String::from).into_iter().collect()
        );
        assert!(d.intent_intact());
        seen.push((d.state_revision(), d.state_str("city").map(str::to_string)));
        d.ack().await.expect("ack");
    }
    seen.sort();
    assert_eq!(
        seen,
        vec![(2, Some("Oslo".to_string())), (4, Some("Rome".to_string()))]
    );
    let mut wide = client.subscribe("wide", "w1", 1).await.expect("subscribe");
    let d = next_within(&mut wide, WAIT).await.expect("delivery");
    let keys: BTreeSet<String> = d.state().expect("state").values.keys().cloned().collect();
    assert!(keys.contains("card") && keys.contains("nights") && keys.contains("city"));
    assert_eq!(d.pinned().ask, "plan a trip");
    assert!(d.intent_intact());
    assert_eq!(
        d.raw().pinned_digest,
        state::intent_digest(d.raw().pinned.as_ref(), d.raw().state.as_ref())
    );
}

#[tokio::test]
async fn revisions_stored_as_deltas_read_back_whole_at_every_revision() {
    use prost::Message as _;
    // No cache: every read rebuilds its revision from the store.
    let (nats, _broker, client) = stack(|c| c.state_cache_bytes = 0).await;
    let run = agent_and_run(
        &client,
        "worker",
        RunConfig::new("olga")
            .pin_state("order_id", "A-1")
            .state("city", "Oslo"),
    )
    .await;
    // What each revision must hold, kept by the test.
    let mut model: Vec<std::collections::BTreeMap<String, state::Value>> = vec![[
        ("order_id".to_string(), s("A-1")),
        ("city".to_string(), s("Oslo")),
    ]
    .into()];
    for i in 2..=40u32 {
        let mut next = model.last().cloned().expect("a revision");
        let key = format!("k{}", i % 7);
        let delta = if i % 5 == 0 && next.contains_key(&key) {
            next.remove(&key);
            StateDelta::new().unset(&key)
        } else {
            next.insert(key.clone(), s(&format!("v{i}")));
            StateDelta::new().set(&key, format!("v{i}").as_str())
        };
        let receipt = client
            .handoff(
                Handoff::to(&run.id, "worker", &note("n", i))
                    .expect("handoff")
                    .state_delta(delta),
            )
            .await
            .expect("handoff");
        assert_eq!(receipt.state_revision, u64::from(i));
        model.push(next);
    }
    for (i, want) in model.iter().enumerate() {
        let rev = i as u64 + 1;
        let got = client.get_state(&run.id, rev).await.expect("revision");
        let values: std::collections::BTreeMap<String, state::Value> =
            got.state.expect("state").values.into_iter().collect();
        assert_eq!(&values, want, "revision {rev}");
        assert_eq!(got.latest_revision, 40);
    }
    // As stored: the seed and every 16th whole, the others only what they
    // wrote.
    let js = async_nats::jetstream::new(
        async_nats::connect(nats.url())
            .await
            .expect("a NATS client"),
    );
    let bucket = js.get_key_value("handoff_state").await.expect("the bucket");
    let mut sizes = Vec::new();
    for rev in [1u64, 15, 16, 17, 32, 33] {
        let raw = bucket
            .get(format!("{}.{rev}", run.id))
            .await
            .expect("read")
            .expect("stored");
        let record = pb::StateRecord::decode(raw.clone()).expect("a record");
        let whole = rev == 1 || rev % 16 == 0;
        assert_eq!(record.partial, !whole, "revision {rev}");
        if !whole {
            assert!(
                record.entries.len() <= 1,
                "revision {rev} keeps what it wrote"
            );
        }
        sizes.push((rev, raw.len()));
    }
    let size = |rev| sizes.iter().find(|(r, _)| *r == rev).map_or(0, |(_, n)| *n);
    assert!(
        size(33) < size(32),
        "a delta is smaller than the snapshot: {sizes:?}"
    );

    // `handoffctl run export`: the run, its timeline and every revision.
    let export = handoffctl::export::export(&client, &run.id)
        .await
        .expect("export");
    assert_eq!(export["format"], "handoff.run-export.v1");
    assert_eq!(export["run"]["id"], run.id.as_str());
    assert_eq!(export["run"]["status"], "RUN_STATUS_RUNNING");
    let timeline = export["timeline"].as_array().expect("a timeline");
    let accepted = timeline
        .iter()
        .filter(|e| e["kind"] == "EVENT_KIND_HANDOFF_ACCEPTED")
        .count();
    assert_eq!(accepted, 39, "one accepted event per handoff");
    let revisions = export["state"].as_array().expect("revisions");
    assert_eq!(revisions.len(), model.len());
    for (i, want) in model.iter().enumerate() {
        let values = revisions[i]["state"]["values"].as_object().expect("values");
        let keys: BTreeSet<&String> = values.keys().collect();
        assert_eq!(keys, want.keys().collect(), "revision {}", i + 1);
    }
    assert_eq!(revisions[16]["state"]["values"]["city"], "Oslo");
}

// ------------------------------------------------------------ signals

mod shop {
    /// `shop.v1.Lookup`.
    #[derive(Clone, PartialEq, prost::Message)]
    pub(crate) struct Lookup {
        #[prost(string, tag = "1")]
        pub(crate) order_id: String,
        #[prost(string, tag = "2")]
        pub(crate) query: String,
    }
    impl prost::Name for Lookup {
        const NAME: &'static str = "Lookup";
        const PACKAGE: &'static str = "shop.v1";
    }
    /// `shop.v1.Answer` and `shop.v1.StrictAnswer`: the same fields, one
    /// contract with `carry` and one without.
    macro_rules! answer {
        ($name:ident) => {
            #[derive(Clone, PartialEq, prost::Message)]
            pub(crate) struct $name {
                #[prost(string, tag = "1")]
                pub(crate) order_id: String,
                #[prost(string, tag = "2")]
                pub(crate) text: String,
            }
            impl prost::Name for $name {
                const NAME: &'static str = stringify!($name);
                const PACKAGE: &'static str = "shop.v1";
            }
        };
    }
    answer!(Answer);
    answer!(StrictAnswer);
    pub(crate) const PROTO: &str = r#"
syntax = "proto3";
package shop.v1;
message Lookup { string order_id = 1; string query = 2; }
message Answer { string order_id = 1; string text = 2; }
message StrictAnswer { string order_id = 1; string text = 2; }
"#;
}

#[tokio::test]
async fn a_field_dropped_on_an_edge_is_reported_and_refused_where_the_contract_carries_it() {
    let (_nats, broker, client) =
        stack(|c| c.metrics_listen = Some(([127, 0, 0, 1], 0).into())).await;
    let metrics = broker.metrics_addr.expect("the metrics endpoint");
    let fds = compile_proto(&[("shop/v1/shop.proto", shop::PROTO)]);
    for spec in [
        ContractSpec::of::<shop::Lookup>(fds.clone()),
        ContractSpec::of::<shop::Answer>(fds.clone()),
        ContractSpec::of::<shop::StrictAnswer>(fds.clone()).carry("order_id"),
    ] {
        client.register_contract(spec).await.expect("contract");
    }
    // An unknown carry field is refused at registration.
    let err = client
        .register_contract(ContractSpec::of::<shop::StrictAnswer>(fds).carry("nope"))
        .await
        .expect_err("unknown carry field");
    assert_eq!(err.reason(), Some("INVALID_CONTRACT"), "{err}");
    client
        .register_agent(
            AgentConfig::new("a")
                .accepts::<shop::Lookup>()
                .emits::<shop::Lookup>(),
        )
        .await
        .expect("a");
    client
        .register_agent(
            AgentConfig::new("b")
                .accepts::<shop::Lookup>()
                .emits::<shop::Answer>()
                .emits::<shop::StrictAnswer>(),
        )
        .await
        .expect("b");
    client
        .register_agent(AgentConfig::new("c").accepts::<shop::Answer>())
        .await
        .expect("c");
    client
        .register_agent(AgentConfig::new("strict").accepts::<shop::StrictAnswer>())
        .await
        .expect("strict");
    let run = client.start_run(RunConfig::new("olga")).await.expect("run");
    let lookup = |order_id: &str| shop::Lookup {
        order_id: order_id.to_string(),
        query: "where is it".to_string(),
    };
    client
        .handoff(Handoff::to(&run.id, "a", &lookup("A-1")).expect("handoff"))
        .await
        .expect("owner -> a");
    // A carries order_id on: nothing dropped.
    let mut a = client.subscribe("a", "a1", 1).await.expect("subscribe");
    let d = next_within(&mut a, WAIT).await.expect("a's delivery");
    let kept = d
        .handoff(Handoff::to(&run.id, "b", &lookup("A-1")).expect("handoff"))
        .await
        .expect("a -> b");
    assert!(kept.dropped_fields.is_empty());
    // B drops it: to a contract that carries it, refused; to one that does
    // not, accepted and reported.
    let mut b = client.subscribe("b", "b1", 1).await.expect("subscribe");
    let d = next_within(&mut b, WAIT).await.expect("b's delivery");
    let answer = |order_id: &str| shop::Answer {
        order_id: order_id.to_string(),
        text: "on its way".to_string(),
    };
    let strict = shop::StrictAnswer {
        order_id: String::new(),
        text: "on its way".to_string(),
    };
    let err = d
        .handoff(Handoff::to(&run.id, "strict", &strict).expect("handoff"))
        .await
        .expect_err("carry refuses the drop");
    assert_eq!(err.kind(), ErrorKind::FailedPrecondition);
    assert_eq!(err.reason(), Some("DROPPED_FIELD"), "{err}");
    assert_eq!(
        err.metadata().get("fields").map(String::as_str),
        Some("order_id")
    );
    let dropped = d
        .handoff(Handoff::to(&run.id, "c", &answer("")).expect("handoff"))
        .await
        .expect("b -> c, dropping order_id");
    assert_eq!(dropped.dropped_fields, vec!["order_id".to_string()]);
    let timeline = timeline_when(&client, &run.id, |t| {
        count(t, &[pb::EventKind::HandoffAccepted], |_| true) == 3
    })
    .await;
    let edges: Vec<(String, String, Vec<String>)> = timeline
        .iter()
        .filter(|e| e.kind == pb::EventKind::HandoffAccepted as i32)
        .map(|e| {
            (
                e.source_agent.clone(),
                e.agent.clone(),
                e.dropped_fields.clone(),
            )
        })
        .collect();
    assert_eq!(
        edges,
        vec![
            (String::new(), "a".to_string(), vec![]),
            ("a".to_string(), "b".to_string(), vec![]),
            (
                "b".to_string(),
                "c".to_string(),
                vec!["order_id".to_string()]
            ),
        ]
    );
    assert_eq!(
        count(&timeline, &[pb::EventKind::ContractRejected], |e| e.rule
            == "carry"),
        1
    );
    let stats = client
        .get_run(&run.id)
        .await
        .expect("run")
        .run
        .and_then(|r| r.stats)
        .expect("stats");
    assert_eq!(stats.dropped_fields, 1);
    // ... and counted by edge and field, never by run: the accepted drop;
    // the refused one is a contract rejection by rule `carry`.
    let scraped = scrape_parsed(metrics).await;
    let dropped = |source: &str, target: &str| {
        scraped.value(
            "handoff_dropped_fields_total",
            &[
                ("field", "order_id"),
                ("source", source),
                ("target", target),
            ],
        )
    };
    assert_eq!(dropped("b", "c"), 1.0);
    assert_eq!(dropped("a", "b"), 0.0);
    assert_eq!(scraped.series("handoff_dropped_fields_total").len(), 1);
    assert_eq!(
        scraped.value("handoff_contract_rejections_total", &[("rule", "carry")]),
        1.0
    );
}

#[tokio::test]
async fn a_reask_for_a_key_the_state_holds_is_counted_and_answered_from_state() {
    let (_nats, broker, client) =
        stack(|c| c.metrics_listen = Some(([127, 0, 0, 1], 0).into())).await;
    let metrics = broker.metrics_addr.expect("the metrics endpoint");
    let run = agent_and_run(
        &client,
        "human",
        RunConfig::new("olga").state("city", "Oslo"),
    )
    .await;
    let receipt = client
        .handoff(
            Handoff::to(&run.id, "human", &note("which city and budget?", 1))
                .expect("handoff")
                .from_agent("planner")
                .asks_for("city")
                .asks_for("budget"),
        )
        .await
        .expect("handoff");
    assert_eq!(receipt.answers.len(), 1);
    assert_eq!(receipt.answers.get("city"), Some(&s("Oslo")));
    let timeline = client.get_run(&run.id).await.expect("run").timeline;
    let accepted = timeline
        .iter()
        .find(|e| e.kind == pb::EventKind::HandoffAccepted as i32)
        .expect("accepted");
    assert_eq!(accepted.reasks, vec!["city".to_string()]);
    let stats = client
        .get_run(&run.id)
        .await
        .expect("run")
        .run
        .and_then(|r| r.stats)
        .expect("stats");
    assert_eq!(stats.reasks, 1);
    // Asking for a key the state does not hold is no re-ask.
    let fresh = client
        .handoff(
            Handoff::to(&run.id, "human", &note("budget?", 2))
                .expect("handoff")
                .asks_for("budget"),
        )
        .await
        .expect("handoff");
    assert!(fresh.answers.is_empty());
    let scraped = scrape_parsed(metrics).await;
    assert_eq!(
        scraped.value("handoff_stale_state_reasks_total", &[("agent", "planner")]),
        1.0
    );
    assert_eq!(scraped.series("handoff_stale_state_reasks_total").len(), 1);
}

/// A three-hop run of `pipeline` with a judge answering `score`; returns
/// the run as it ended and its timeline once the judge's events are in.
async fn judged_run(client: &Client, pipeline: &str, score: f64) -> (pb::Run, Vec<pb::Event>) {
    let run = client
        .start_run(
            RunConfig::new("olga")
                .pipeline(pipeline)
                .ask("find a quiet hotel in Oslo")
                .judge("judge", 0.7),
        )
        .await
        .expect("run");
    client
        .handoff(Handoff::to(&run.id, "planner", &note("plan", 1)).expect("handoff"))
        .await
        .expect("owner -> planner");
    let mut planner = client
        .subscribe("planner", "p1", 1)
        .await
        .expect("subscribe");
    let d = next_within(&mut planner, WAIT)
        .await
        .expect("planner's delivery");
    d.handoff(Handoff::to(&run.id, "writer", &note("draft", 2)).expect("handoff"))
        .await
        .expect("planner -> writer");
    let mut writer = client
        .subscribe("writer", "w1", 1)
        .await
        .expect("subscribe");
    let d = next_within(&mut writer, WAIT)
        .await
        .expect("writer's delivery");
    d.handoff(Handoff::final_result(&run.id, &note("Hotel Quiet, Oslo", 3)).expect("final"))
        .await
        .expect("writer: final");
    let mut judge = client.subscribe("judge", "j1", 1).await.expect("subscribe");
    let d = next_within(&mut judge, WAIT)
        .await
        .expect("the judge's request");
    let request = d.judge_request().expect("a judge request");
    assert_eq!(request.run_id, run.id);
    assert_eq!(request.pipeline, pipeline);
    assert_eq!(
        request.pinned.map(|p| p.ask).as_deref(),
        Some("find a quiet hotel in Oslo")
    );
    // Inline here: judge_result answers it as it is.
    let fetched = d.judge_result().await.expect("the judge's result");
    assert_eq!(fetched.as_ref(), request.result.as_ref());
    let result: handoff_tests::Note =
        handoff_client::decode(&request.result.expect("the result")).expect("a note");
    assert_eq!(result.text, "Hotel Quiet, Oslo");
    d.judge(score, "checked against the ask")
        .await
        .expect("verdict");
    let timeline = timeline_when(client, &run.id, |t| {
        count(t, &[pb::EventKind::IntentScored], |_| true) == 1
    })
    .await;
    let run = client
        .get_run(&run.id)
        .await
        .expect("run")
        .run
        .expect("run");
    (run, timeline)
}

#[tokio::test]
async fn the_judges_score_is_recorded_drift_is_emitted_under_the_threshold_and_runs_count_their_handoffs(
) {
    let (_nats, broker, client) =
        stack(|c| c.metrics_listen = Some(([127, 0, 0, 1], 0).into())).await;
    let metrics = broker.metrics_addr.expect("the metrics endpoint");
    for agent in ["planner", "writer", "judge"] {
        client
            .register_agent(AgentConfig::new(agent))
            .await
            .expect("agent");
    }
    let (low, timeline) = judged_run(&client, "travel", 0.4).await;
    assert_eq!(low.status, pb::RunStatus::Completed as i32);
    let intent = low.intent.expect("scored");
    assert!((intent.score - 0.4).abs() < 1e-9);
    assert!(intent.drift);
    assert_eq!(intent.judge_agent, "judge");
    assert_eq!(count(&timeline, &[pb::EventKind::IntentDrift], |_| true), 1);
    let stats = low.stats.expect("stats");
    assert_eq!((stats.handoffs, stats.hops, stats.redeliveries), (3, 3, 0));

    let (high, timeline) = judged_run(&client, "travel", 0.9).await;
    let intent = high.intent.expect("scored");
    assert!(!intent.drift);
    // The evidence of no drift: the run's whole timeline, after its score.
    assert_eq!(count(&timeline, &[pb::EventKind::IntentDrift], |_| true), 0);
    assert_eq!(
        count(&timeline, &[pb::EventKind::IntentScored], |e| (e
            .intent_score
            - 0.9)
            .abs()
            < 1e-9),
        1
    );

    // A second verdict changes nothing; a score outside [0, 1] is refused.
    let err = client
        .handoff(
            Handoff::final_result(
                &high.id,
                &pb::JudgeVerdict {
                    score: 0.1,
                    reason: String::new(),
                },
            )
            .expect("final"),
        )
        .await
        .expect_err("the run is closed to anything but its judge's delivery");
    assert_eq!(err.reason(), Some("RUN_CLOSED"), "{err}");

    // Per pipeline: two scores (one under the threshold), and two
    // completed runs of three handoffs each.
    let scraped = scrape_parsed(metrics).await;
    let travel = [("pipeline", "travel")];
    assert_eq!(scraped.value("handoff_intent_score_count", &travel), 2.0);
    assert!((scraped.value("handoff_intent_score_sum", &travel) - 1.3).abs() < 1e-9);
    assert_eq!(scraped.value("handoff_intent_drift_total", &travel), 1.0);
    let completed = [("outcome", "completed"), ("pipeline", "travel")];
    assert_eq!(scraped.value("handoff_run_handoffs_count", &completed), 2.0);
    assert_eq!(scraped.value("handoff_run_handoffs_sum", &completed), 6.0);
}

#[tokio::test]
async fn a_branch_its_barrier_refuses_changes_no_state() {
    let (_nats, _broker, client) = stack(|_| {}).await;
    let run = agent_and_run(&client, "agg", RunConfig::new("olga").state("city", "Oslo")).await;
    client
        .raw()
        .open_barrier(pb::OpenBarrierRequest {
            barrier: Some(pb::BarrierSpec {
                run_id: run.id.clone(),
                barrier_id: "join".into(),
                branch_keys: vec!["a".into(), "b".into()],
                target_agent: "agg".into(),
                ..Default::default()
            }),
        })
        .await
        .expect("barrier");
    let branch = |key: &str, n: u32| {
        Handoff::to_barrier(&run.id, "join", key, &note("result", n))
            .expect("branch")
            .from_agent("worker")
            .state_delta(StateDelta::new().append("found", [s(key)]))
    };
    let err = client
        .handoff(branch("c", 1))
        .await
        .expect_err("no branch c");
    assert_eq!(err.reason(), Some("UNKNOWN_BRANCH_KEY"), "{err}");
    assert_eq!(revision(&client, &run.id).await, 1);
    assert_eq!(value(&client, &run.id, 0, "found").await, None);
    // The branches it has apply, and the release hands over both deltas.
    for (n, key) in ["a", "b"].iter().enumerate() {
        client.handoff(branch(key, n as u32)).await.expect("branch");
    }
    let mut agg = client.subscribe("agg", "g1", 1).await.expect("subscribe");
    let release = next_within(&mut agg, WAIT).await.expect("the release");
    assert_eq!(release.state_revision(), 3);
    let found = release.state_value("found").expect("found");
    let mut keys: Vec<&str> = state::as_list(found)
        .expect("a list")
        .iter()
        .filter_map(state::as_str)
        .collect();
    keys.sort();
    assert_eq!(keys, vec!["a", "b"]);
}

#[tokio::test]
async fn a_delivery_whose_intent_digest_does_not_match_is_rejected_unless_trusted() {
    let (_nats, _broker, client) = stack(|c| c.faults.corrupt_intent_digest = true).await;
    client
        .register_agent(AgentConfig::new("reader"))
        .await
        .expect("agent");
    let run = client
        .start_run(RunConfig::new("olga").ask("keep to the ask"))
        .await
        .expect("run");
    let receipt = client
        .handoff(Handoff::to(&run.id, "reader", &note("x", 1)).expect("handoff"))
        .await
        .expect("owner -> reader");
    {
        // Never handed to the application: rejected, which fails the run
        // naming the reason.
        let mut sub = client
            .subscribe("reader", "r1", 1)
            .await
            .expect("subscribe");
        let timeline = timeline_when(&client, &run.id, |t| {
            count(t, &[pb::EventKind::RunFailed], |_| true) == 1
        })
        .await;
        let rejected: Vec<&pb::Event> = timeline
            .iter()
            .filter(|e| e.kind == pb::EventKind::Rejected as i32)
            .collect();
        assert_eq!(rejected.len(), 1, "{timeline:?}");
        assert_eq!(rejected[0].handoff_id, receipt.handoff_id);
        assert!(
            rejected[0]
                .reason
                .starts_with(handoff_client::INTENT_MISMATCH),
            "{}",
            rejected[0].reason
        );
        assert!(next_within(&mut sub, Duration::from_millis(200))
            .await
            .is_none());
    }
    // A subscription that trusts intent gets it, and sees it is broken.
    let run = client
        .start_run(RunConfig::new("olga").ask("keep to the ask"))
        .await
        .expect("run");
    client
        .handoff(Handoff::to(&run.id, "reader", &note("y", 2)).expect("handoff"))
        .await
        .expect("owner -> reader");
    let mut trusting = client
        .subscribe_with(
            "reader",
            "r2",
            handoff_client::SubscribeOptions::new(1).trust_intent(),
        )
        .await
        .expect("subscribe");
    let d = next_within(&mut trusting, WAIT)
        .await
        .expect("the delivery, handed on");
    assert!(!d.intent_intact());
    d.ack().await.expect("ack");
}

#[tokio::test]
async fn a_keyed_handoff_retried_after_the_window_and_100_deltas_is_a_duplicate_that_applies_nothing(
) {
    // JetStream's dedupe window is 2 s here: a retry past it stands for
    // one 20 minutes later on the default window. Past it, and past 100
    // other deltas (more than a revision remembers the appliers of), only
    // the key recorded with the run recognises the retry.
    let (nats, _broker, client) = stack(|c| c.dedupe_window = Duration::from_secs(2)).await;
    keep_inboxes(nats.url()).await;
    let run = agent_and_run(
        &client,
        "worker",
        RunConfig::new("olga").state("city", "Oslo"),
    )
    .await;
    let keyed = |n: f64| {
        Handoff::to(&run.id, "worker", &note("kick-off", 1))
            .expect("handoff")
            .idempotency_key("kick-off")
            .state_delta(StateDelta::new().set("first", n))
    };
    let started = std::time::Instant::now();
    let first = client.handoff(keyed(1.0)).await.expect("first");
    assert!(!first.duplicate);
    assert_eq!(first.state_revision, 2);
    for i in 0..100 {
        client
            .handoff(
                Handoff::to(&run.id, "worker", &note("other", i))
                    .expect("handoff")
                    .idempotency_key(format!("other-{i}"))
                    .state_delta(StateDelta::new().set(format!("n{i}"), f64::from(i))),
            )
            .await
            .expect("another delta");
    }
    assert_eq!(revision(&client, &run.id).await, 102);
    tokio::time::sleep(Duration::from_millis(2500).saturating_sub(started.elapsed())).await;
    // Retried, with its delta written differently: the first's answer.
    let retry = client.handoff(keyed(99.0)).await.expect("retry");
    assert!(retry.duplicate, "{retry:?}");
    assert_eq!(
        (&retry.handoff_id, retry.sequence, retry.state_revision),
        (&first.handoff_id, first.sequence, 2)
    );
    // Nothing applied, nothing stored twice, announced once.
    assert_eq!(revision(&client, &run.id).await, 102);
    assert_eq!(value(&client, &run.id, 0, "first").await, Some(1.0.into()));
    assert_eq!(inbox(nats.url(), "worker").await.stored, 101);
    let timeline = client.get_run(&run.id).await.expect("run").timeline;
    let announced = count(&timeline, &[pb::EventKind::HandoffAccepted], |e| {
        e.handoff_id == first.handoff_id
    });
    assert_eq!(announced, 1);
}

/// Decides how run `run_id` ends, as a call that stopped right after
/// deciding would have (nothing recorded on the run); the state bucket.
async fn decide_end(
    nats_url: &str,
    run_id: &str,
    how: pb::Run,
) -> async_nats::jetstream::kv::Store {
    use prost::Message as _;
    let js = async_nats::jetstream::new(async_nats::connect(nats_url).await.expect("nats"));
    let bucket = js
        .get_key_value("handoff_state")
        .await
        .expect("state bucket");
    bucket
        .create(format!("{run_id}.end.0"), how.encode_to_vec().into())
        .await
        .expect("the end decided");
    bucket
}

#[tokio::test]
async fn a_final_handoff_is_refused_storing_no_delta_when_the_run_end_was_decided_first() {
    use prost::Message as _;
    let (nats, _broker, client) = stack(|_| {}).await;
    let run = agent_and_run(
        &client,
        "worker",
        RunConfig::new("olga").state("city", "Oslo"),
    )
    .await;
    let final_with = |run: &str, city: &str| {
        Handoff::final_result(run, &note("done", 1))
            .expect("handoff")
            .state_delta(StateDelta::based_on(1).set("city", city))
    };

    // A cancel that decided the run's end and stopped before recording it
    // on the run: its decision, beside the run's state (the run still
    // reads RUNNING).
    let decided = pb::Run {
        status: pb::RunStatus::Cancelled as i32,
        failure: "cancelled by olga".into(),
        ..Default::default()
    };
    let bucket = decide_end(nats.url(), &run.id, decided).await;
    let read = client
        .get_run(&run.id)
        .await
        .expect("run")
        .run
        .expect("run");
    assert_eq!(read.status, pb::RunStatus::Running as i32);

    // The final handoff is refused, and its delta is not stored.
    let err = client
        .handoff(final_with(&run.id, "Rome"))
        .await
        .expect_err("the run's end was decided");
    assert_eq!(err.reason(), Some("RUN_CLOSED"), "{err}");
    assert_eq!(revision(&client, &run.id).await, 1);
    assert_eq!(value(&client, &run.id, 0, "city").await, Some(s("Oslo")));
    let timeline = client.get_run(&run.id).await.expect("run").timeline;
    assert_eq!(
        count(&timeline, &[pb::EventKind::HandoffAccepted], |_| true),
        0
    );

    // The refused handoff recorded the end as it was decided.
    let read = client
        .get_run(&run.id)
        .await
        .expect("run")
        .run
        .expect("run");
    assert_eq!(read.status, pb::RunStatus::Cancelled as i32);
    assert_eq!(read.failure, "cancelled by olga");

    // In a run whose end nobody decided, the final handoff's delta and
    // the run's end are stored together, and a later cancel is refused.
    let other = client
        .start_run(RunConfig::new("olga").state("city", "Oslo"))
        .await
        .expect("run");
    let done = client
        .handoff(final_with(&other.id, "Rome"))
        .await
        .expect("final");
    assert_eq!(done.state_revision, 2);
    assert_eq!(value(&client, &other.id, 0, "city").await, Some(s("Rome")));
    let entry = bucket
        .get(format!("{}.end.0", other.id))
        .await
        .expect("read")
        .expect("its end is recorded");
    let how = pb::Run::decode(entry).expect("decodes");
    assert_eq!(how.status, pb::RunStatus::Completed as i32);
    assert_eq!(how.result_handoff_id, done.handoff_id);
    let err = client
        .cancel_run(&other.id, "too late")
        .await
        .expect_err("completed");
    assert_eq!(err.reason(), Some("RUN_CLOSED"), "{err}");
}

#[tokio::test]
async fn a_run_completed_by_a_final_handoff_that_stopped_after_deciding_is_recorded_and_announced()
{
    let (nats, _broker, client) = stack(|_| {}).await;
    let run = agent_and_run(&client, "worker", RunConfig::new("olga")).await;
    // A final handoff decided the run's end 20 s ago and stopped there:
    // nothing recorded on the run, no acceptance announced.
    let at = std::time::SystemTime::now() - Duration::from_secs(20);
    let decided = pb::Run {
        status: pb::RunStatus::Completed as i32,
        result_handoff_id: "the-final".into(),
        ended_at: Some(at.into()),
        ..Default::default()
    };
    decide_end(nats.url(), &run.id, decided).await;
    // The owner's cancel finds it decided: refused, the run recorded as
    // completed, and the final's acceptance announced once.
    let err = client
        .cancel_run(&run.id, "stop")
        .await
        .expect_err("completed already");
    assert_eq!(err.reason(), Some("RUN_CLOSED"), "{err}");
    let got = client.get_run(&run.id).await.expect("run");
    let read = got.run.expect("run");
    assert_eq!(read.status, pb::RunStatus::Completed as i32);
    assert_eq!(read.result_handoff_id, "the-final");
    let announced = count(&got.timeline, &[pb::EventKind::HandoffAccepted], |e| {
        e.handoff_id == "the-final"
    });
    assert_eq!(announced, 1);
    let ended = count(&got.timeline, &[pb::EventKind::RunCompleted], |_| true);
    assert_eq!(ended, 1);
}

#[tokio::test]
async fn an_event_jetstream_stored_twice_under_one_message_id_is_once_in_the_timeline() {
    use prost::Message as _;
    // JetStream's deduplication can miss (across a change of the events
    // stream's leader); here, past a short window.
    let (nats, _broker, client) = stack(|c| c.dedupe_window = Duration::from_secs(1)).await;
    let run = agent_and_run(&client, "worker", RunConfig::new("olga")).await;
    let nc = async_nats::connect(nats.url()).await.expect("nats");
    let js = async_nats::jetstream::new(nc);
    let event = pb::Event {
        kind: pb::EventKind::HandoffAccepted as i32,
        run_id: run.id.clone(),
        owner: "olga".into(),
        handoff_id: "twice".into(),
        ..Default::default()
    };
    let subject = format!("handoff.v1.events.{}.handoff_accepted", run.id);
    for copy in 0..2 {
        let mut headers = async_nats::HeaderMap::new();
        headers.insert("Nats-Msg-Id", "accepted-twice");
        let ack = js
            .publish_with_headers(subject.clone(), headers, event.encode_to_vec().into())
            .await
            .expect("publish")
            .await
            .expect("stored");
        assert!(!ack.duplicate, "copy {copy} is stored");
        tokio::time::sleep(Duration::from_millis(1500)).await;
    }
    let timeline = client.get_run(&run.id).await.expect("run").timeline;
    let once = count(&timeline, &[pb::EventKind::HandoffAccepted], |e| {
        e.handoff_id == "twice"
    });
    assert_eq!(once, 1);
}
