//! Finding runs: the first page of `ListRuns` with many runs stored,
//! next to raw JetStream reading the same page's records by key, and
//! raw JetStream listing the runs bucket's keys (what a listing without
//! an index would at least have to do).

use std::time::{Duration, Instant};

use futures::{StreamExt, TryStreamExt};
use handoff_client::{pb, Client, RunConfig};
use hdrhistogram::Histogram;
use indicatif::ProgressBar;

use crate::{report::histogram, scenarios::connect, BoxError};

/// Owners the runs are spread over (a listing by owner matches 1 in 10).
pub(crate) const OWNERS: u64 = 10;

/// Starts `n` runs of owners `list-0` .. `list-9`, then one more of owner
/// `list-last`, and waits until `ListRuns` shows that last one (the index
/// follows the runs bucket in order, so it then knows every run).
pub(crate) async fn populate(client: &Client, n: u64, bar: &ProgressBar) -> Result<(), BoxError> {
    futures::stream::iter(0..n)
        .map(|i| {
            let (client, bar) = (client.clone(), bar.clone());
            async move {
                client
                    .start_run(RunConfig::new(format!("list-{}", i % OWNERS)).no_timeout())
                    .await?;
                bar.inc(1);
                Ok::<(), BoxError>(())
            }
        })
        .buffer_unordered(64)
        .try_collect::<Vec<_>>()
        .await?;
    let last = client
        .start_run(RunConfig::new("list-last").no_timeout())
        .await?;
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let page = client
            .list_runs(pb::ListRunsRequest {
                owner: "list-last".into(),
                ..Default::default()
            })
            .await?;
        if page
            .runs
            .iter()
            .any(|s| s.run.as_ref().is_some_and(|r| r.id == last.id))
        {
            bar.finish_and_clear();
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err("the run index did not catch up within 120 s".into());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// `samples` first pages of 50 (of owner `owner`, if given), one at a
/// time; with the ids of the last page read.
pub(crate) async fn first_pages(
    client: &Client,
    samples: u64,
    owner: Option<&str>,
) -> Result<(Histogram<u64>, Vec<String>), BoxError> {
    let mut h = histogram();
    let mut ids = Vec::new();
    for _ in 0..samples {
        let req = pb::ListRunsRequest {
            owner: owner.unwrap_or_default().to_string(),
            page_size: 50,
            ..Default::default()
        };
        let started = Instant::now();
        let page = client.list_runs(req).await?;
        h.record(started.elapsed().as_micros() as u64)?;
        if page.runs.len() != 50 {
            return Err(format!("a first page held {} runs, not 50", page.runs.len()).into());
        }
        ids = page
            .runs
            .into_iter()
            .filter_map(|s| s.run.map(|r| r.id))
            .collect();
    }
    Ok((h, ids))
}

/// Raw JetStream reading `ids`' run records from the runs bucket, all at
/// once, `samples` times.
pub(crate) async fn raw_page(
    nats_url: &str,
    ids: &[String],
    samples: u64,
) -> Result<Histogram<u64>, BoxError> {
    let js = connect(nats_url).await?;
    let runs = js.get_key_value("handoff_runs").await?;
    let mut h = histogram();
    for _ in 0..samples {
        let started = Instant::now();
        let read = futures::future::try_join_all(ids.iter().map(|id| runs.get(id))).await?;
        h.record(started.elapsed().as_micros() as u64)?;
        if read.iter().any(Option::is_none) {
            return Err("a listed run is not in the runs bucket".into());
        }
    }
    Ok(h)
}

/// Raw JetStream listing every key of the runs bucket, once; with how
/// many there were.
pub(crate) async fn raw_scan(nats_url: &str) -> Result<(Histogram<u64>, u64), BoxError> {
    let js = connect(nats_url).await?;
    let runs = js.get_key_value("handoff_runs").await?;
    let mut h = histogram();
    let started = Instant::now();
    let keys: Vec<String> = runs.keys().await?.try_collect().await?;
    h.record(started.elapsed().as_micros() as u64)?;
    Ok((h, keys.len() as u64))
}
