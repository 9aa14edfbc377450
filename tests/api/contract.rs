//! Contract safety, in the spirit of `buf breaking` (wire level): the committed snapshot
//! of the descriptor set is what released clients were generated from; the current protos
//! must not break them. Refresh the snapshot only for a deliberate new release:
//! `KRISP_UPDATE_PROTO_SNAPSHOT=1 cargo test --test api contract`.

use std::collections::{HashMap, HashSet};

use krisp_ingest::proto::FILE_DESCRIPTOR_SET;
use prost::Message;
use prost_types::{DescriptorProto, EnumDescriptorProto, FileDescriptorSet};

const SNAPSHOT: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/proto/snapshot/krisp-ingest-v1.binpb"
);

fn current() -> FileDescriptorSet {
    FileDescriptorSet::decode(FILE_DESCRIPTOR_SET).unwrap()
}

/// Every message (by full name) of our package, nested ones included.
fn messages(set: &FileDescriptorSet) -> HashMap<String, DescriptorProto> {
    fn walk(prefix: &str, message: &DescriptorProto, out: &mut HashMap<String, DescriptorProto>) {
        let name = format!("{prefix}.{}", message.name());
        for nested in &message.nested_type {
            walk(&name, nested, out);
        }
        out.insert(name, message.clone());
    }
    let mut out = HashMap::new();
    for file in set.file.iter().filter(|f| f.package() == "krisp.ingest.v1") {
        for message in &file.message_type {
            walk(&format!(".{}", file.package()), message, &mut out);
        }
    }
    out
}

fn enums(set: &FileDescriptorSet) -> HashMap<String, EnumDescriptorProto> {
    let mut out = HashMap::new();
    for file in set.file.iter().filter(|f| f.package() == "krisp.ingest.v1") {
        for e in &file.enum_type {
            out.insert(format!(".{}.{}", file.package(), e.name()), e.clone());
        }
    }
    out
}

fn reserved_numbers(message: &DescriptorProto) -> impl Fn(i32) -> bool + '_ {
    |n| {
        message
            .reserved_range
            .iter()
            .any(|r| r.start() <= n && n < r.end())
    }
}

/// Wire-breaking differences from `old` to `new`.
fn breaking_changes(old: &FileDescriptorSet, new: &FileDescriptorSet) -> Vec<String> {
    let mut problems = Vec::new();
    let (old_messages, new_messages) = (messages(old), messages(new));
    for (name, old_message) in &old_messages {
        let Some(new_message) = new_messages.get(name) else {
            problems.push(format!("message {name} was removed"));
            continue;
        };
        let reserved = reserved_numbers(new_message);
        for old_field in &old_message.field {
            match new_message
                .field
                .iter()
                .find(|f| f.number() == old_field.number())
            {
                None if !reserved(old_field.number()) => problems.push(format!(
                    "{name}: field {} ({}) was removed without reserving its number",
                    old_field.number(),
                    old_field.name()
                )),
                None => {}
                Some(new_field) => {
                    if new_field.r#type() != old_field.r#type()
                        || new_field.type_name() != old_field.type_name()
                    {
                        problems.push(format!(
                            "{name}: field {} changed type from {:?} {} to {:?} {}",
                            old_field.number(),
                            old_field.r#type(),
                            old_field.type_name(),
                            new_field.r#type(),
                            new_field.type_name()
                        ));
                    }
                    if new_field.label() != old_field.label() {
                        problems.push(format!(
                            "{name}: field {} changed label",
                            old_field.number()
                        ));
                    }
                    if new_field.oneof_index.is_some() != old_field.oneof_index.is_some() {
                        problems.push(format!(
                            "{name}: field {} moved in or out of a oneof",
                            old_field.number()
                        ));
                    }
                }
            }
        }
    }
    let new_enums = enums(new);
    for (name, old_enum) in enums(old) {
        let Some(new_enum) = new_enums.get(&name) else {
            problems.push(format!("enum {name} was removed"));
            continue;
        };
        let numbers: HashSet<i32> = new_enum.value.iter().map(|v| v.number()).collect();
        let reserved = |n: i32| {
            new_enum
                .reserved_range
                .iter()
                .any(|r| r.start() <= n && n <= r.end())
        };
        for value in &old_enum.value {
            if !numbers.contains(&value.number()) && !reserved(value.number()) {
                problems.push(format!(
                    "enum {name}: value {} ({}) was removed",
                    value.number(),
                    value.name()
                ));
            }
        }
    }
    let services = |set: &FileDescriptorSet| {
        set.file
            .iter()
            .flat_map(|f| {
                f.service
                    .iter()
                    .map(move |s| (format!("{}.{}", f.package(), s.name()), s.clone()))
            })
            .collect::<HashMap<_, _>>()
    };
    let new_services = services(new);
    for (name, old_service) in services(old) {
        let Some(new_service) = new_services.get(&name) else {
            problems.push(format!("service {name} was removed"));
            continue;
        };
        for old_method in &old_service.method {
            match new_service
                .method
                .iter()
                .find(|m| m.name() == old_method.name())
            {
                None => problems.push(format!("{name}: rpc {} was removed", old_method.name())),
                Some(m) => {
                    if m.input_type() != old_method.input_type()
                        || m.output_type() != old_method.output_type()
                    {
                        problems.push(format!(
                            "{name}: rpc {} changed its request or response type",
                            m.name()
                        ));
                    }
                    if m.client_streaming() != old_method.client_streaming()
                        || m.server_streaming() != old_method.server_streaming()
                    {
                        problems.push(format!("{name}: rpc {} changed streaming", m.name()));
                    }
                }
            }
        }
    }
    problems.sort();
    problems
}

#[test]
fn the_protos_do_not_break_clients_of_the_snapshot() {
    if std::env::var_os("KRISP_UPDATE_PROTO_SNAPSHOT").is_some() {
        std::fs::write(SNAPSHOT, FILE_DESCRIPTOR_SET).unwrap();
    }
    let snapshot = FileDescriptorSet::decode(
        std::fs::read(SNAPSHOT)
            .expect("committed snapshot")
            .as_slice(),
    )
    .unwrap();
    let problems = breaking_changes(&snapshot, &current());
    assert!(
        problems.is_empty(),
        "wire-breaking changes against the snapshot:\n{}",
        problems.join("\n")
    );
}

fn message<'a>(set: &'a mut FileDescriptorSet, name: &str) -> &'a mut DescriptorProto {
    set.file
        .iter_mut()
        .flat_map(|f| f.message_type.iter_mut())
        .find(|m| m.name() == name)
        .unwrap()
}

#[test]
fn the_checker_catches_breaking_changes() {
    let base = current();
    let edit = |change: &dyn Fn(&mut FileDescriptorSet)| {
        let mut changed = base.clone();
        change(&mut changed);
        breaking_changes(&base, &changed)
    };
    // Removing a field without reserving its number.
    let removed = edit(&|set| {
        message(set, "NewSentiment")
            .field
            .retain(|f| f.name() != "score")
    });
    assert!(
        removed
            .iter()
            .any(|p| p.contains("NewSentiment") && p.contains("removed")),
        "{removed:?}"
    );
    // ... is fine once the number is reserved.
    let reserved = edit(&|set| {
        let m = message(set, "NewSentiment");
        let number = m
            .field
            .iter()
            .find(|f| f.name() == "score")
            .unwrap()
            .number();
        m.field.retain(|f| f.name() != "score");
        m.reserved_range
            .push(prost_types::descriptor_proto::ReservedRange {
                start: Some(number),
                end: Some(number + 1),
            });
    });
    assert!(reserved.is_empty(), "{reserved:?}");
    // Changing a field's type.
    let retyped = edit(&|set| {
        let m = message(set, "User");
        m.field[0].set_type(prost_types::field_descriptor_proto::Type::Bytes);
    });
    assert!(
        retyped.iter().any(|p| p.contains("changed type")),
        "{retyped:?}"
    );
    // Removing an RPC, or making a unary one streaming.
    let no_rpc = edit(&|set| {
        for file in &mut set.file {
            for service in &mut file.service {
                service.method.retain(|m| m.name() != "GetTimeline");
            }
        }
    });
    assert!(
        no_rpc
            .iter()
            .any(|p| p.contains("rpc GetTimeline was removed")),
        "{no_rpc:?}"
    );
    // Adding a field is not breaking.
    let added = edit(&|set| {
        let m = message(set, "User");
        let mut field = m.field[0].clone();
        field.number = Some(99);
        field.name = Some("nickname".into());
        m.field.push(field);
    });
    assert!(added.is_empty(), "{added:?}");
}

/// buf STANDARD lint rules the contract keeps: request/response per RPC named after it,
/// enum zero values named *_UNSPECIFIED, values prefixed with the enum's name.
#[test]
fn the_protos_follow_the_standard_style() {
    let set = current();
    for file in set.file.iter().filter(|f| f.package() == "krisp.ingest.v1") {
        assert!(
            file.name().starts_with("krisp/ingest/v1/"),
            "{}",
            file.name()
        );
        for service in &file.service {
            assert!(service.name().ends_with("Service"));
            for method in &service.method {
                assert_eq!(
                    method.input_type(),
                    format!(".krisp.ingest.v1.{}Request", method.name())
                );
                assert_eq!(
                    method.output_type(),
                    format!(".krisp.ingest.v1.{}Response", method.name())
                );
            }
        }
        for e in &file.enum_type {
            let prefix = e
                .name()
                .chars()
                .enumerate()
                .flat_map(|(i, c)| {
                    let sep = (i > 0 && c.is_uppercase()).then_some('_');
                    sep.into_iter().chain(c.to_uppercase())
                })
                .collect::<String>();
            assert_eq!(e.value[0].number(), 0);
            assert_eq!(e.value[0].name(), format!("{prefix}_UNSPECIFIED"));
            for value in &e.value {
                assert!(
                    value.name().starts_with(&format!("{prefix}_")),
                    "{}",
                    value.name()
                );
            }
        }
    }
}
