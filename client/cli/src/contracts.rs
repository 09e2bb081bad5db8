//! `handoffctl contracts`: register, list, show, set compatibility.

use super::*;

pub(super) async fn contracts_register(client: &Client, args: RegisterContractArgs) -> Outcome {
    let (descriptors, source) = match (&args.descriptor_set, &args.proto) {
        (Some(file), _) => (
            std::fs::read(file).map_err(|e| Failure(format!("reading {}: {e}", file.display())))?,
            file,
        ),
        (None, Some(file)) => (compile_proto(file, &args.includes)?, file),
        (None, None) => {
            return Err(Failure(
                "give --descriptor-set FILE or --proto FILE".to_string(),
            ))
        }
    };
    // Checked here too, so a wrong file or type name gets a local answer.
    let pool = DescriptorPool::decode(descriptors.as_slice()).map_err(|e| {
        Failure(format!(
            "{} is not a valid FileDescriptorSet: {}",
            source.display(),
            one_line(&e.to_string())
        ))
    })?;
    if pool.get_message_by_name(&args.message_type).is_none() {
        let mut known: Vec<String> = pool
            .all_messages()
            .filter(|m| !m.is_map_entry() && !m.full_name().starts_with("google.protobuf."))
            .map(|m| m.full_name().to_string())
            .collect();
        known.sort();
        let known = if known.is_empty() {
            "no messages".to_string()
        } else {
            known.join(", ")
        };
        return Err(Failure(format!(
            "message type {} is not defined in {} (it defines {known})",
            args.message_type,
            source.display()
        )));
    }
    let mut spec = ContractSpec::named(&args.message_type, descriptors);
    if let Some(v) = args.version {
        spec = spec.version(v);
    }
    if let Some(mode) = args.compatibility {
        spec = spec.compatibility(mode);
    }
    for path in args.required {
        spec = spec.require(path);
    }
    if let Some(n) = args.max_tokens {
        spec = spec.max_tokens(n);
    }
    if let Some(n) = args.max_bytes {
        spec = spec.max_bytes(n);
    }
    if let Some(c) = args.min_confidence {
        spec = spec.min_confidence(c);
    }
    if let Some(age) = args.max_tool_result_age {
        spec = spec.max_tool_result_age(age);
    }
    for field in &args.carry {
        spec = spec.carry(field.clone());
    }
    let registered = client.register_contract(spec).await?;
    let c = &registered.contract;
    out(&format!(
        "{} version {} {} fingerprint={}\n",
        c.message_type,
        c.version,
        if registered.created {
            "created"
        } else {
            "unchanged"
        },
        c.fingerprint
    ))
}

/// Compiles `file` (and its imports, found under `includes` or the file's
/// own directory) into an encoded FileDescriptorSet.
pub(super) fn compile_proto(file: &Path, includes: &[PathBuf]) -> Result<Vec<u8>, Failure> {
    if let Err(e) = std::fs::metadata(file) {
        return Err(Failure(format!("reading {}: {e}", file.display())));
    }
    let includes: Vec<PathBuf> = if includes.is_empty() {
        vec![match file.parent() {
            Some(dir) if !dir.as_os_str().is_empty() => dir.to_path_buf(),
            _ => PathBuf::from("."),
        }]
    } else {
        includes.to_vec()
    };
    protox::Compiler::new(&includes)
        .and_then(|mut c| {
            c.include_imports(true).include_source_info(false);
            c.open_file(file)?;
            Ok(c.encode_file_descriptor_set())
        })
        .map_err(|e| {
            Failure(format!(
                "compiling {}: {}",
                file.display(),
                one_line(&e.to_string())
            ))
        })
}

pub(super) async fn contracts_list(client: &Client, message_type: Option<&str>) -> Outcome {
    let mut contracts = client.list_contracts(message_type).await?;
    contracts.sort_by(|a, b| {
        (a.message_type.as_str(), a.version).cmp(&(b.message_type.as_str(), b.version))
    });
    let rows = contracts
        .iter()
        .map(|c| {
            vec![
                c.message_type.clone(),
                c.version.to_string(),
                display::compatibility(c.compatibility).to_string(),
                display::timestamp(c.registered_at),
                display::rules_summary(c.rules.as_ref()),
            ]
        })
        .collect();
    out(&table(
        &["TYPE", "VERSION", "COMPATIBILITY", "REGISTERED", "RULES"],
        rows,
    ))
}

pub(super) async fn contracts_set_compatibility(
    client: &Client,
    message_type: &str,
    mode: pb::Compatibility,
    reason: &str,
) -> Outcome {
    let resp = client.set_compatibility(message_type, mode, reason).await?;
    let latest = resp.contract.map_or(0, |c| c.version);
    let previous = display::compatibility(resp.previous);
    let now = display::compatibility(mode as i32);
    if resp.changed {
        out(&format!(
            "{message_type} compatibility {previous} -> {now} (latest version {latest}; the next is checked under {now})\n"
        ))
    } else {
        out(&format!(
            "{message_type} compatibility is already {now} (unchanged)\n"
        ))
    }
}

pub(super) async fn contracts_show(client: &Client, message_type: &str, version: u32) -> Outcome {
    let c = client.get_contract(message_type, version).await?;
    let mut text = format!(
        "contract {} version {}\ncompatibility: {}\nfingerprint: {}\nregistered at: {}\n",
        c.message_type,
        c.version,
        display::compatibility(c.compatibility),
        c.fingerprint,
        display::timestamp(c.registered_at)
    );
    text.push_str(&rules_text(c.rules.as_ref()));
    let pool = DescriptorPool::decode(c.file_descriptor_set.as_slice()).map_err(|e| {
        Failure(format!(
            "the contract's descriptor set does not decode: {}",
            one_line(&e.to_string())
        ))
    })?;
    let message = pool.get_message_by_name(&c.message_type).ok_or_else(|| {
        Failure(format!(
            "the contract's descriptor set does not define {}",
            c.message_type
        ))
    })?;
    text.push_str(&fields_text(&message));
    out(&text)
}

/// A contract's rules, one per line.
pub(super) fn rules_text(rules: Option<&pb::ContractRules>) -> String {
    let mut lines = Vec::new();
    if let Some(r) = rules {
        if !r.required_fields.is_empty() {
            lines.push(format!(
                "  required fields: {}",
                r.required_fields.join(", ")
            ));
        }
        if r.max_tokens > 0 {
            lines.push(format!("  max tokens: {}", r.max_tokens));
        }
        if r.max_bytes > 0 {
            lines.push(format!("  max bytes: {}", r.max_bytes));
        }
        if let Some(c) = r.min_confidence {
            lines.push(format!("  min confidence: {c}"));
        }
        if let Some(age) = r.max_tool_result_age {
            let age = Duration::try_from(age)
                .map(|d| humantime::format_duration(d).to_string())
                .unwrap_or_else(|_| "invalid".to_string());
            lines.push(format!("  max tool result age: {age}"));
        }
    }
    if lines.is_empty() {
        "rules: none\n".to_string()
    } else {
        format!("rules:\n{}\n", lines.join("\n"))
    }
}

/// The message's fields as a table: number, name, type.
pub(super) fn fields_text(message: &MessageDescriptor) -> String {
    let mut fields: Vec<FieldDescriptor> = message.fields().collect();
    fields.sort_by_key(|f| f.number());
    let rows = fields
        .iter()
        .map(|f| vec![f.number().to_string(), f.name().to_string(), field_type(f)])
        .collect();
    let body = table(&["NUMBER", "NAME", "TYPE"], rows);
    let mut text = format!("fields of {}:\n", message.full_name());
    for line in body.lines() {
        text.push_str("  ");
        text.push_str(line);
        text.push('\n');
    }
    text
}

/// A field's type as written in a `.proto` file (`repeated string`,
/// `map<string, int32>`, `optional uint32`, `acme.v1.Citation`).
pub(super) fn field_type(f: &FieldDescriptor) -> String {
    if f.is_map() {
        if let Kind::Message(entry) = f.kind() {
            return format!(
                "map<{}, {}>",
                kind_name(&entry.map_entry_key_field().kind()),
                kind_name(&entry.map_entry_value_field().kind())
            );
        }
    }
    let name = kind_name(&f.kind());
    if f.is_list() {
        return format!("repeated {name}");
    }
    match f.containing_oneof() {
        Some(o) if o.is_synthetic() => format!("optional {name}"),
        Some(o) => format!("{name} (oneof {})", o.name()),
        None => name,
    }
}

pub(super) fn kind_name(kind: &Kind) -> String {
    match kind {
        Kind::Double => "double",
        Kind::Float => "float",
        Kind::Int32 => "int32",
        Kind::Int64 => "int64",
        Kind::Uint32 => "uint32",
        Kind::Uint64 => "uint64",
        Kind::Sint32 => "sint32",
        Kind::Sint64 => "sint64",
        Kind::Fixed32 => "fixed32",
        Kind::Fixed64 => "fixed64",
        Kind::Sfixed32 => "sfixed32",
        Kind::Sfixed64 => "sfixed64",
        Kind::Bool => "bool",
        Kind::String => "string",
        Kind::Bytes => "bytes",
        Kind::Message(m) => return m.full_name().to_string(),
        Kind::Enum(e) => return e.full_name().to_string(),
    }
    .to_string()
}

/// Joins a multi-line message into one line.
pub(super) fn one_line(s: &str) -> String {
    s.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join("; ")
}
