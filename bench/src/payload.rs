//! `payload`: handoffs of 1 MiB and 16 MiB end to end, from submitting the
//! handoff to the delivery in hand with its payload fetched from the
//! broker's object store and checked against its size and SHA-256 by the
//! SDK, next to a raw JetStream object-store put and get of the same bytes
//! against the same server.

use std::time::{Duration, Instant};

use async_nats::jetstream::{self, object_store};
use handoff_client::{AgentConfig, Client, Handoff, RunConfig};
use hdrhistogram::Histogram;
use indicatif::ProgressBar;
use tokio::io::AsyncReadExt as _;

use crate::{report::histogram, BoxError};

/// The sizes measured, with their label and how many handoffs of each.
pub(crate) const SIZES: &[(usize, &str, u64)] = &[(1 << 20, "1 MiB", 40), (16 << 20, "16 MiB", 10)];

const AGENT: &str = "bench-payload";
const WAIT: Duration = Duration::from_secs(120);

/// The payload: opaque bytes (no strings, so no tokens to count).
#[derive(Clone, PartialEq, prost::Message)]
struct Blob {
    #[prost(bytes = "vec", tag = "1")]
    data: Vec<u8>,
}

impl prost::Name for Blob {
    const NAME: &'static str = "Blob";
    const PACKAGE: &'static str = "handoff.bench";
}

fn blob(size: usize, seed: u8) -> Blob {
    Blob {
        data: (0..size)
            .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
            .collect(),
    }
}

/// `count` handoffs of `size` bytes through handoffd (submit -> delivered
/// and resolved), then as many raw object-store puts and gets.
pub(crate) async fn run(
    client: &Client,
    url: &str,
    replicas: usize,
    size: usize,
    count: u64,
    bar: &ProgressBar,
) -> Result<(Histogram<u64>, Histogram<u64>), BoxError> {
    client.register_agent(AgentConfig::new(AGENT)).await?;
    let run = client.start_run(RunConfig::new("bench")).await?;
    let mut sub = client.subscribe(AGENT, "bench-payload-1", 1).await?;
    let (mut handoff, mut raw) = (histogram(), histogram());
    let warmup = 2;
    for i in 0..count + warmup {
        // A fresh payload each time: nothing is stored once for all.
        let sent = blob(size, i as u8);
        let start = Instant::now();
        client.handoff(Handoff::to(&run.id, AGENT, &sent)?).await?;
        let d = match tokio::time::timeout(WAIT, sub.next_delivery()).await {
            Ok(Some(d)) => d?,
            _ => return Err("payload: no delivery".into()),
        };
        let got: Blob = d.payload()?;
        let took = start.elapsed();
        if got.data.len() != size || d.payload_ref().is_none() {
            return Err("payload: not delivered by reference, intact".into());
        }
        d.ack().await?;
        if i >= warmup {
            handoff.record(took.as_micros() as u64)?;
            bar.inc(1);
        }
    }

    let servers = url
        .split(',')
        .map(|u| u.trim().parse::<async_nats::ServerAddr>())
        .collect::<Result<Vec<_>, _>>()?;
    let js = jetstream::new(async_nats::connect(servers).await?);
    let store = js
        .create_object_store(object_store::Config {
            bucket: "bench_payloads".into(),
            num_replicas: replicas,
            ..Default::default()
        })
        .await?;
    for i in 0..count + warmup {
        let value = prost::Message::encode_to_vec(&blob(size, i as u8));
        let name = format!("{size}-{i}");
        let start = Instant::now();
        store
            .put(
                object_store::ObjectMetadata {
                    name: name.clone(),
                    chunk_size: Some(512 * 1024),
                    ..Default::default()
                },
                &mut value.as_slice(),
            )
            .await?;
        let mut object = store.get(&name).await?;
        let mut read = Vec::with_capacity(value.len());
        object.read_to_end(&mut read).await?;
        let took = start.elapsed();
        if read != value {
            return Err("raw object store: read back altered".into());
        }
        if i >= warmup {
            raw.record(took.as_micros() as u64)?;
        }
    }
    js.delete_object_store("bench_payloads").await?;
    bar.finish_and_clear();
    Ok((handoff, raw))
}
