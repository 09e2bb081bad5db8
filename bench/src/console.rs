//! The console: the runs page's first page with many runs stored (next to
//! raw JetStream reading that page's records), and how long an event
//! takes to reach an open run page: from the handoff call to the page's
//! live stream (`/live?run=`) telling it, and to the run page read again
//! showing the event (what the page's script does), next to raw
//! JetStream's publish-to-consumer latency of one event.

use std::{
    net::SocketAddr,
    time::{Duration, Instant},
};

use futures::StreamExt;
use handoff_client::{AgentConfig, Client, Handoff, RunConfig};
use handoff_proto::demo::Subtask;
use hdrhistogram::Histogram;
use tokio::{
    io::{AsyncBufReadExt, AsyncWriteExt, BufReader},
    net::TcpStream,
};

use crate::{report::histogram, scenarios::connect, BoxError};

/// The agent the latency samples hand off to.
const AGENT: &str = "console-bench";

/// `GET /` (the runs page, its first 50 runs) `samples` times.
pub(crate) async fn runs_page(
    addr: SocketAddr,
    path: &str,
    samples: u64,
) -> Result<Histogram<u64>, BoxError> {
    let mut h = histogram();
    for _ in 0..samples {
        let started = Instant::now();
        let page = handoff_tests::http_get(addr, path).await;
        h.record(started.elapsed().as_micros() as u64)?;
        if page.status != 200 || page.body.matches("data-run-id=").count() < 50 {
            return Err(format!("the runs page answered {} without 50 runs", page.status).into());
        }
    }
    Ok(h)
}

/// Opens the live stream of one run; returns its lines once the stream
/// answered (the broker watches the run before it answers).
async fn open_live(
    addr: SocketAddr,
    run_id: &str,
) -> Result<tokio::io::Lines<BufReader<TcpStream>>, BoxError> {
    let mut socket = TcpStream::connect(addr).await?;
    socket.set_nodelay(true)?;
    let request = format!(
        "GET /live?run={run_id} HTTP/1.1\r\nhost: localhost\r\naccept: text/event-stream\r\n\r\n"
    );
    socket.write_all(request.as_bytes()).await?;
    let mut lines = BufReader::new(socket).lines();
    let status = lines.next_line().await?.unwrap_or_default();
    if !status.contains(" 200 ") {
        return Err(format!("the live stream answered {status:?}").into());
    }
    while let Some(line) = lines.next_line().await? {
        if line.is_empty() {
            break;
        }
    }
    Ok(lines)
}

/// Event to screen: per sample a new run with its page's live stream
/// open, a handoff; the time to the stream's `handoff_accepted` line, and
/// to the run page read again showing the handoff.
pub(crate) async fn event_to_page(
    client: &Client,
    addr: SocketAddr,
    samples: u64,
) -> Result<(Histogram<u64>, Histogram<u64>), BoxError> {
    client.register_agent(AgentConfig::new(AGENT)).await?;
    let (mut told, mut shown) = (histogram(), histogram());
    for _ in 0..samples {
        let run = client.start_run(RunConfig::new("console-bench")).await?;
        let mut lines = open_live(addr, &run.id).await?;
        let task = Subtask {
            instruction: "measure".into(),
            ..Default::default()
        };
        let started = Instant::now();
        let receipt = client.handoff(Handoff::to(&run.id, AGENT, &task)?).await?;
        loop {
            let line = tokio::time::timeout(Duration::from_secs(10), lines.next_line())
                .await
                .map_err(|_| "no live event within 10 s")??
                .ok_or("the live stream ended")?;
            if line.starts_with("data: ") && line.contains(" handoff_accepted ") {
                break;
            }
        }
        told.record(started.elapsed().as_micros() as u64)?;
        let page = handoff_tests::http_get(addr, &format!("/runs/{}", run.id)).await;
        if !page.body.contains(&receipt.handoff_id) {
            return Err("the run page read after the event lacks its handoff".into());
        }
        shown.record(started.elapsed().as_micros() as u64)?;
    }
    Ok((told, shown))
}

/// Raw JetStream: one event published and read by an ordered push
/// consumer that was waiting for it, `samples` times.
pub(crate) async fn raw_event(nats_url: &str, samples: u64) -> Result<Histogram<u64>, BoxError> {
    use async_nats::jetstream::{consumer, stream};
    let js = connect(nats_url).await?;
    let name = "BENCH_CONSOLE_RAW";
    let _ = js.delete_stream(name).await;
    let s = js
        .create_stream(stream::Config {
            name: name.into(),
            subjects: vec!["bench.console.raw".into()],
            ..Default::default()
        })
        .await?;
    let consumer = s
        .create_consumer(consumer::push::OrderedConfig {
            deliver_subject: "bench.console.raw.deliver".into(),
            ..Default::default()
        })
        .await?;
    let mut messages = consumer.messages().await?;
    let mut h = histogram();
    for i in 0..samples {
        let started = Instant::now();
        js.publish("bench.console.raw", format!("{i}").into_bytes().into())
            .await?
            .await?;
        tokio::time::timeout(Duration::from_secs(10), messages.next())
            .await
            .map_err(|_| "raw event not read within 10 s")?
            .ok_or("raw consumer ended")??;
        h.record(started.elapsed().as_micros() as u64)?;
    }
    let _ = js.delete_stream(name).await;
    Ok(h)
}
