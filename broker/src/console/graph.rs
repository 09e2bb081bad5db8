//! The run graph, drawn as inline SVG from the run's timeline: agents as
//! nodes, handoffs as numbered edges in causal order, each barrier as a
//! node listing its branches with their status, refusals and dead letters
//! marked, the agents holding a delivery now highlighted.

use std::collections::{BTreeMap, HashMap, HashSet};

use handoff_proto::pb::{self, EventKind as K};

const START: &str = "\u{0}start";
const END: &str = "\u{0}end";
const COL: i64 = 200;
const ROW: i64 = 90;
const W: i64 = 150;
const H: i64 = 44;
const PAD: i64 = 20;

struct Node {
    key: String,
    label: String,
    kind: &'static str,
    layer: i64,
    row: i64,
    /// Branches of a barrier: key -> status.
    branches: BTreeMap<String, String>,
    dead: bool,
    refused: bool,
    current: bool,
}

struct Edge {
    from: String,
    to: String,
    kind: &'static str,
    label: String,
    order: usize,
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
        .replace('\'', "&#39;")
}

/// Adds the next edge in order, labelled with its number and `what`.
fn push_edge(edges: &mut Vec<Edge>, from: String, to: String, kind: &'static str, what: &str) {
    let order = edges.len() + 1;
    let label = if what.is_empty() {
        order.to_string()
    } else {
        format!("{order} {what}")
    };
    edges.push(Edge {
        from,
        to,
        kind,
        label,
        order,
    });
}

fn barrier_key(id: &str) -> String {
    format!("\u{0}barrier:{id}")
}

/// The SVG of a run's graph (a timeline in causal order).
pub(crate) fn draw(run: &pb::Run, timeline: &[pb::Event]) -> String {
    let mut nodes: Vec<Node> = Vec::new();
    let mut index: HashMap<String, usize> = HashMap::new();
    let mut edges: Vec<Edge> = Vec::new();
    let mut node = |nodes: &mut Vec<Node>, key: &str, label: &str, kind: &'static str| -> usize {
        if let Some(i) = index.get(key) {
            return *i;
        }
        nodes.push(Node {
            key: key.to_string(),
            label: label.to_string(),
            kind,
            layer: -1,
            row: 0,
            branches: BTreeMap::new(),
            dead: false,
            refused: false,
            current: false,
        });
        index.insert(key.to_string(), nodes.len() - 1);
        nodes.len() - 1
    };
    node(&mut nodes, START, &run.owner, "start");
    let mut holding: HashMap<String, String> = HashMap::new();
    for e in timeline {
        let kind = K::try_from(e.kind).unwrap_or(K::Unspecified);
        let source = if e.source_agent.is_empty() {
            START.to_string()
        } else {
            e.source_agent.clone()
        };
        match kind {
            K::HandoffAccepted => {
                if e.agent.is_empty() && !e.branch_key.is_empty() {
                    // A branch result: drawn by its arrival.
                    continue;
                }
                let to = if e.agent.is_empty() {
                    END
                } else {
                    e.agent.as_str()
                };
                let label = if to == END { "result" } else { to };
                node(&mut nodes, &source, &e.source_agent, "agent");
                node(
                    &mut nodes,
                    to,
                    label,
                    if to == END { "end" } else { "agent" },
                );
                let kind = if e.branch_key.is_empty() {
                    "handoff"
                } else {
                    "branch"
                };
                push_edge(&mut edges, source, to.to_string(), kind, &e.branch_key);
            }
            K::BarrierOpened => {
                let key = barrier_key(&e.barrier_id);
                node(
                    &mut nodes,
                    &key,
                    &format!("barrier {}", e.barrier_id),
                    "barrier",
                );
            }
            K::BranchArrived | K::BranchLate => {
                let key = barrier_key(&e.barrier_id);
                let b = node(
                    &mut nodes,
                    &key,
                    &format!("barrier {}", e.barrier_id),
                    "barrier",
                );
                nodes[b].branches.insert(
                    e.branch_key.clone(),
                    if kind == K::BranchLate {
                        "late"
                    } else {
                        "arrived"
                    }
                    .to_string(),
                );
                node(&mut nodes, &source, &e.source_agent, "agent");
                push_edge(&mut edges, source, key, "arrival", &e.branch_key);
            }
            K::BarrierReleased | K::BarrierTimedOut => {
                let key = barrier_key(&e.barrier_id);
                node(
                    &mut nodes,
                    &key,
                    &format!("barrier {}", e.barrier_id),
                    "barrier",
                );
                if kind == K::BarrierReleased && !e.agent.is_empty() {
                    node(&mut nodes, &e.agent, &e.agent, "agent");
                    push_edge(&mut edges, key, e.agent.clone(), "release", "release");
                }
            }
            K::ContractRejected | K::Rejected if !e.agent.is_empty() => {
                let n = node(&mut nodes, &e.agent, &e.agent, "agent");
                nodes[n].refused = true;
            }
            K::DeadLettered if !e.agent.is_empty() => {
                let n = node(&mut nodes, &e.agent, &e.agent, "agent");
                nodes[n].dead = true;
            }
            K::Delivered | K::Redelivered => {
                holding.insert(e.handoff_id.clone(), e.agent.clone());
            }
            K::Acked | K::Nacked | K::Discarded | K::RoutedToFallback => {
                holding.remove(&e.handoff_id);
            }
            _ => {}
        }
    }
    // Each barrier's branches from the fan-out that opened it.
    for e in timeline {
        if e.kind == K::HandoffAccepted as i32
            && !e.barrier_id.is_empty()
            && !e.branch_key.is_empty()
            && !e.agent.is_empty()
        {
            if let Some(&b) = index.get(&barrier_key(&e.barrier_id)) {
                nodes[b]
                    .branches
                    .entry(e.branch_key.clone())
                    .or_insert_with(|| "pending".to_string());
            }
        }
    }
    let running = matches!(
        pb::RunStatus::try_from(run.status),
        Ok(pb::RunStatus::Running | pb::RunStatus::WaitingInput)
    );
    if running {
        let current: HashSet<&String> = holding.values().collect();
        for n in &mut nodes {
            n.current = current.contains(&n.key);
        }
    }
    // Layers: each node one right of the first node that reached it.
    nodes[0].layer = 0;
    for e in &edges {
        let (Some(&f), Some(&t)) = (index.get(&e.from), index.get(&e.to)) else {
            continue;
        };
        if nodes[f].layer < 0 {
            nodes[f].layer = 0;
        }
        if nodes[t].layer < 0 {
            nodes[t].layer = nodes[f].layer + 1;
        }
    }
    let mut rows: HashMap<i64, i64> = HashMap::new();
    for n in &mut nodes {
        if n.layer < 0 {
            n.layer = 0;
        }
        let r = rows.entry(n.layer).or_insert(0);
        n.row = *r;
        *r += 1 + i64::try_from(n.branches.len()).unwrap_or(0) / 2;
    }
    let height_of = |n: &Node| H + 22 * i64::try_from(n.branches.len()).unwrap_or(0);
    let pos = |n: &Node| (PAD + n.layer * COL, PAD + n.row * ROW);
    let width = PAD * 2 + (nodes.iter().map(|n| n.layer).max().unwrap_or(0) + 1) * COL;
    let height = PAD * 2
        + nodes
            .iter()
            .map(|n| pos(n).1 + height_of(n))
            .max()
            .unwrap_or(H);
    let mut out = String::new();
    out.push_str(&format!(
        "<svg id=\"graph\" role=\"img\" aria-labelledby=\"graph-title\" viewBox=\"0 0 {width} {height}\" width=\"{width}\" height=\"{height}\" xmlns=\"http://www.w3.org/2000/svg\">\
<title id=\"graph-title\">Graph of run {}: {} agents and barriers, {} edges</title>\
<defs><marker id=\"arrow\" viewBox=\"0 0 10 10\" refX=\"10\" refY=\"5\" markerWidth=\"7\" markerHeight=\"7\" orient=\"auto-start-reverse\"><path d=\"M 0 0 L 10 5 L 0 10 z\"/></marker></defs>",
        esc(&run.id),
        nodes.len(),
        edges.len()
    ));
    // Edges under nodes; parallel edges of one pair share a line.
    let mut pairs: BTreeMap<(String, String), Vec<&Edge>> = BTreeMap::new();
    for e in &edges {
        pairs
            .entry((e.from.clone(), e.to.clone()))
            .or_default()
            .push(e);
    }
    for ((from, to), group) in &pairs {
        let (Some(&f), Some(&t)) = (index.get(from), index.get(to)) else {
            continue;
        };
        let (fx, fy) = pos(&nodes[f]);
        let (tx, ty) = pos(&nodes[t]);
        let (x1, y1) = (fx + W, fy + H / 2);
        let (x2, y2) = if tx > fx {
            (tx, ty + H / 2)
        } else {
            (tx + W / 2, ty + H)
        };
        let kind = group[0].kind;
        let labels: Vec<&str> = group.iter().map(|e| e.label.as_str()).collect();
        let orders: Vec<String> = group.iter().map(|e| e.order.to_string()).collect();
        let label = if group.len() > 2 {
            format!(
                "{} (×{})",
                labels[0].split(' ').next().unwrap_or(""),
                group.len()
            )
        } else {
            labels.join(", ")
        };
        out.push_str(&format!(
            "<g class=\"edge e-{kind}\" data-kind=\"{kind}\" data-from=\"{}\" data-to=\"{}\" data-orders=\"{}\" data-count=\"{}\"><line x1=\"{x1}\" y1=\"{y1}\" x2=\"{x2}\" y2=\"{y2}\" marker-end=\"url(#arrow)\"/><text x=\"{}\" y=\"{}\">{}</text></g>",
            esc(&nodes[f].label),
            esc(&nodes[t].label),
            orders.join(" "),
            group.len(),
            (x1 + x2) / 2,
            (y1 + y2) / 2 - 6,
            esc(&label)
        ));
    }
    for n in &nodes {
        let (x, y) = pos(n);
        let h = height_of(n);
        let mut classes = format!("node n-{}", n.kind);
        if n.current {
            classes.push_str(" current");
        }
        if n.dead {
            classes.push_str(" dead");
        }
        if n.refused {
            classes.push_str(" refused");
        }
        let label = match n.kind {
            "start" => format!("{} (owner)", n.label),
            _ => n.label.clone(),
        };
        let agent_attr = match n.kind {
            "agent" => format!(" data-agent=\"{}\"", esc(&n.label)),
            "barrier" => format!(
                " data-barrier=\"{}\"",
                esc(n.label.trim_start_matches("barrier "))
            ),
            _ => String::new(),
        };
        out.push_str(&format!(
            "<g class=\"{classes}\" data-kind=\"{}\"{agent_attr}><rect x=\"{x}\" y=\"{y}\" width=\"{W}\" height=\"{h}\" rx=\"{}\"/><text x=\"{}\" y=\"{}\">{}</text>",
            n.kind,
            if n.kind == "barrier" { 2 } else { 8 },
            x + 10,
            y + 27,
            esc(&label)
        ));
        if n.dead {
            out.push_str(&format!(
                "<text class=\"mark\" x=\"{}\" y=\"{}\">dead letter</text>",
                x + W - 70,
                y + 12
            ));
        } else if n.refused {
            out.push_str(&format!(
                "<text class=\"mark\" x=\"{}\" y=\"{}\">refused</text>",
                x + W - 52,
                y + 12
            ));
        }
        for (i, (key, status)) in n.branches.iter().enumerate() {
            let by = y + H + 22 * i64::try_from(i).unwrap_or(0);
            out.push_str(&format!(
                "<g class=\"branch b-{}\" data-key=\"{}\" data-status=\"{}\"><rect x=\"{}\" y=\"{}\" width=\"{}\" height=\"18\" rx=\"3\"/><text x=\"{}\" y=\"{}\">{}: {}</text></g>",
                esc(status),
                esc(key),
                esc(status),
                x + 8,
                by - 4,
                W - 16,
                x + 14,
                by + 9,
                esc(key),
                esc(status)
            ));
        }
        out.push_str("</g>");
    }
    out.push_str("</svg>");
    out
}
