//! Operating runs: find, cancel, fork, answer, redrive, and show one
//! handoff.

use prost_reflect::{DescriptorPool, DynamicMessage};

use super::*;

pub(super) async fn runs_list(client: &Client, args: RunsListArgs) -> Outcome {
    let mut req = pb::ListRunsRequest {
        owner: args.owner.unwrap_or_default(),
        status: args.statuses,
        pipeline: args.pipeline.unwrap_or_default(),
        agent: args.agent.unwrap_or_default(),
        started_after: args.since,
        started_before: args.until,
        has_dead_letters: args.dead_letters,
        drift: args.drift,
        ..Default::default()
    };
    let mut found = Vec::new();
    while found.len() < args.limit {
        req.page_size = u32::try_from((args.limit - found.len()).min(500)).unwrap_or(500);
        let page = client.list_runs(req.clone()).await?;
        found.extend(page.runs);
        if page.next_page_token.is_empty() {
            break;
        }
        req.page_token = page.next_page_token;
    }
    let rows = found
        .iter()
        .map(|s| {
            let run = s.run.clone().unwrap_or_default();
            vec![
                run.id.clone(),
                or_dash(&run.owner),
                display::status(run.status).to_string(),
                if run.pipeline.is_empty() {
                    "default".to_string()
                } else {
                    run.pipeline.clone()
                },
                display::timestamp(run.created_at),
                run.ended_at
                    .map_or_else(|| "-".to_string(), |t| display::timestamp(Some(t))),
                or_dash(&s.agents.join(",")),
                s.dead_letters.to_string(),
                if s.drift { "drift" } else { "-" }.to_string(),
            ]
        })
        .collect();
    out(&table(
        &[
            "RUN",
            "OWNER",
            "STATUS",
            "PIPELINE",
            "STARTED",
            "ENDED",
            "AGENTS",
            "DEAD_LETTERS",
            "NOTE",
        ],
        rows,
    ))
}

pub(super) async fn run_cancel(client: &Client, id: &str, reason: &str) -> Outcome {
    let run = client.cancel_run(id, reason).await?;
    out(&format!(
        "{} {} ({})\n",
        run.id,
        display::status(run.status),
        run.failure
    ))
}

/// A payload of registered contract `message_type` from its JSON.
async fn payload(
    client: &Client,
    message_type: &str,
    json: &str,
) -> Result<prost_types::Any, Failure> {
    let contract = client.get_contract(message_type, 0).await?;
    let pool = DescriptorPool::decode(contract.file_descriptor_set.as_slice()).map_err(|e| {
        Failure(format!(
            "the contract of {message_type} does not decode: {e}"
        ))
    })?;
    let descriptor = pool
        .get_message_by_name(message_type)
        .ok_or_else(|| Failure(format!("the contract does not describe {message_type}")))?;
    let mut de = serde_json::Deserializer::from_str(json);
    let message = DynamicMessage::deserialize(descriptor, &mut de)
        .map_err(|e| Failure(format!("--json is not a {message_type}: {e}")))?;
    Ok(prost_types::Any {
        type_url: format!("type.googleapis.com/{message_type}"),
        value: prost::Message::encode_to_vec(&message),
    })
}

pub(super) async fn run_fork(
    client: &Client,
    id: &str,
    at_revision: u64,
    to: &str,
    args: PayloadArgs,
) -> Outcome {
    let message_type = args
        .message_type
        .ok_or_else(|| Failure("run fork: --type is required".to_string()))?;
    let any = payload(client, &message_type, &args.json).await?;
    let req = pb::ForkRunRequest {
        run_id: id.to_string(),
        at_revision,
        handoff: Some(pb::HandoffRequest {
            target_agent: to.to_string(),
            payload: Some(any),
            ..Default::default()
        }),
        ..Default::default()
    };
    let resp = client
        .raw()
        .fork_run(req)
        .await
        .map_err(handoff_client::Error::from)?;
    let resp = resp.into_inner();
    let run = resp.run.unwrap_or_default();
    out(&format!("{}\n", run.id))?;
    eprintln!(
        "run {} forked from {} at revision {}; first handoff {}",
        run.id,
        run.parent_run_id,
        run.forked_at_revision,
        resp.handoff.map(|h| h.handoff_id).unwrap_or_default()
    );
    Ok(())
}

pub(super) async fn run_answer(
    client: &Client,
    id: &str,
    request: Option<&str>,
    args: PayloadArgs,
) -> Outcome {
    let run = client
        .get_run(id)
        .await?
        .run
        .ok_or_else(|| Failure(format!("the broker answered without run {id:?}")))?;
    let Some(request) = request else {
        let rows = run
            .waiting
            .iter()
            .map(|w| {
                vec![
                    w.id.clone(),
                    w.agent.clone(),
                    display::timestamp(w.asked_at),
                    display::timestamp(w.deadline),
                    w.answer
                        .as_ref()
                        .map_or_else(|| "-".to_string(), |a| a.message_type.clone()),
                    contracts::one_line(&w.prompt),
                ]
            })
            .collect();
        return out(&table(
            &[
                "REQUEST",
                "AGENT",
                "ASKED",
                "DEADLINE",
                "ANSWER_TYPE",
                "PROMPT",
            ],
            rows,
        ));
    };
    let asked = run
        .waiting
        .iter()
        .find(|w| w.id == request)
        .and_then(|w| w.answer.as_ref())
        .map(|a| a.message_type.clone());
    let message_type = args.message_type.or(asked).ok_or_else(|| {
        Failure("run answer: the request names no answer type; give --type".to_string())
    })?;
    let any = payload(client, &message_type, &args.json).await?;
    let req = pb::ProvideInputRequest {
        run_id: id.to_string(),
        request_id: request.to_string(),
        answer: Some(any),
    };
    let resp = client
        .raw()
        .provide_input(req)
        .await
        .map_err(handoff_client::Error::from)?
        .into_inner();
    out(&format!(
        "answered; handoff {} to the agent that asked\n",
        resp.handoff.map(|h| h.handoff_id).unwrap_or_default()
    ))
}

pub(super) async fn handoff_show(client: &Client, id: &str, run: Option<&str>) -> Outcome {
    let resp = client.get_handoff(id, run.unwrap_or_default()).await?;
    let run = resp.run.clone().unwrap_or_default();
    let envelope = resp.handoff.clone().unwrap_or_default();
    let status = pb::HandoffStatus::try_from(resp.status)
        .map(|s| {
            s.as_str_name()
                .trim_start_matches("HANDOFF_STATUS_")
                .to_ascii_lowercase()
        })
        .unwrap_or_else(|_| "unknown".to_string());
    let mut text = format!(
        "handoff {id}\nrun: {} (owner {}, {})\nstatus: {status} after {} attempt(s)\n",
        run.id,
        run.owner,
        display::status(run.status),
        resp.attempts
    );
    if resp.handoff.is_some() {
        text.push_str(&format!(
            "from: {}\nto: {}\ndepth: {}\npayload: {}\n",
            or_dash(&envelope.source_agent),
            or_dash(&envelope.target_agent),
            envelope.depth,
            envelope.payload.as_ref().map_or_else(
                || "by reference".to_string(),
                |p| format!("{} ({} bytes)", p.type_url, p.value.len())
            )
        ));
    } else {
        text.push_str("envelope: no longer kept by the inbox\n");
    }
    text.push_str(&display::run_table(&run, &resp.events));
    out(&text)
}

pub(super) async fn dead_letter_redrive(
    client: &Client,
    sequence: u64,
    to: Option<&str>,
) -> Outcome {
    let resp = client.redrive_dead_letter(sequence, to).await?;
    let run = resp.run.unwrap_or_default();
    out(&format!(
        "handoff {} handed again (run {} {}{})\n",
        resp.handoff.map(|h| h.handoff_id).unwrap_or_default(),
        run.id,
        display::status(run.status),
        if resp.resumed { ", resumed" } else { "" }
    ))
}
