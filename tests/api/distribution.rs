//! The schema is ready for Citus as it stands: the catalog is read and checked against
//! Citus' rules for the choice `deploy/citus.sql` makes for each table; and one client
//! stream writes rows of one user only, so on Citus it stays on one shard.

use std::collections::{BTreeMap, HashSet};

use sqlx::PgPool;
use uuid::Uuid;

use crate::helpers::{count, frames, fresh_database, spawn_app_on};
use krisp_ingest::proto;

const CITUS_SQL: &str = include_str!("../../deploy/citus.sql");

/// Tables Citus leaves local to the coordinator.
const LOCAL: &[&str] = &["_sqlx_migrations"];

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Placement {
    Reference,
    Distributed {
        column: String,
        colocate_with: Option<String>,
    },
}

/// One step of a distribution script, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Step {
    Place(String, Placement),
    /// `SET citus.enable_local_reference_table_foreign_keys = on|off`.
    LocalReferenceKeys(bool),
}

/// The placement of each table, as `deploy/citus.sql` declares it.
pub(crate) fn placements() -> BTreeMap<String, Placement> {
    steps(CITUS_SQL)
        .into_iter()
        .filter_map(|step| match step {
            Step::Place(table, placement) => Some((table, placement)),
            Step::LocalReferenceKeys(_) => None,
        })
        .collect()
}

/// The steps of a distribution script.
fn steps(script: &str) -> Vec<Step> {
    let mut out = Vec::new();
    for line in script.lines().map(str::trim) {
        if let Some(value) = line
            .strip_prefix("SET citus.enable_local_reference_table_foreign_keys")
            .map(|rest| {
                rest.trim_start_matches([' ', '='])
                    .trim_start_matches("TO ")
            })
        {
            out.push(Step::LocalReferenceKeys(!value.starts_with("off")));
            continue;
        }
        let args = |prefix: &str| {
            line.strip_prefix(prefix)
                .and_then(|rest| rest.strip_suffix(");"))
                .map(|args| {
                    args.split(',')
                        .map(|a| a.trim().trim_matches('\'').to_owned())
                        .collect::<Vec<_>>()
                })
        };
        if let Some(args) = args("SELECT create_reference_table(") {
            out.push(Step::Place(args[0].clone(), Placement::Reference));
        } else if let Some(args) = args("SELECT create_distributed_table(") {
            let colocate_with = args.get(2).map(|a| {
                a.trim_start_matches("colocate_with => ")
                    .trim_matches('\'')
                    .to_owned()
            });
            out.push(Step::Place(
                args[0].clone(),
                Placement::Distributed {
                    column: args[1].clone(),
                    colocate_with,
                },
            ));
        }
    }
    out
}

/// Where the order of a distribution script breaks Citus' rules, run over the catalog
/// of `db`:
/// - a table is distributed while a table it references is not yet a Citus table;
/// - `create_reference_table(T)` runs while a local table has a foreign key with T and
///   `citus.enable_local_reference_table_foreign_keys` is on: Citus then converts that
///   local table (and its whole foreign-key graph) into a Citus local table, which fails
///   for partitioned tables (seen on Citus 13.2: "child table is missing constraint").
async fn script_violations(db: &PgPool, script: &str) -> Vec<String> {
    let keys: Vec<(String, String)> = constraints(db)
        .await
        .into_iter()
        .filter_map(|c| c.references.map(|(referenced, _)| (c.table, referenced)))
        .filter(|(table, referenced)| table != referenced)
        .collect();
    let mut citus: HashSet<String> = HashSet::new();
    let mut local_reference_keys = true;
    let mut violations = Vec::new();
    for step in steps(script) {
        let (table, placement) = match step {
            Step::LocalReferenceKeys(on) => {
                local_reference_keys = on;
                continue;
            }
            Step::Place(table, placement) => (table, placement),
        };
        for (from, to) in &keys {
            if *from == table && !citus.contains(to) {
                violations.push(format!(
                    "{table} is made a Citus table while {to}, which it references, is not yet one"
                ));
            }
            let local_partner = (*to == table && !citus.contains(from)).then_some(from);
            if let (Placement::Reference, Some(local), true) =
                (&placement, local_partner, local_reference_keys)
            {
                violations.push(format!(
                    "create_reference_table('{table}') while local table {local} references it \
                     and citus.enable_local_reference_table_foreign_keys is on: Citus would \
                     convert {local} into a Citus local table (it fails for partitioned tables)"
                ));
            }
        }
        citus.insert(table);
    }
    violations
}

/// One constraint as the catalog has it.
#[derive(Debug)]
struct Constraint {
    table: String,
    name: String,
    kind: String,
    columns: Vec<String>,
    /// EXCLUDE: the operator of each column.
    operators: Vec<String>,
    /// FOREIGN KEY: the referenced table and columns.
    references: Option<(String, Vec<String>)>,
}

/// table, name, kind, columns, exclusion operators, referenced table and columns.
type ConstraintRow = (
    String,
    String,
    String,
    Vec<String>,
    Vec<String>,
    Option<String>,
    Vec<String>,
);

async fn constraints(db: &PgPool) -> Vec<Constraint> {
    let rows: Vec<ConstraintRow> = sqlx::query_as(
        "SELECT t.relname::text, c.conname::text, c.contype::text, \
                    ARRAY(SELECT a.attname::text FROM unnest(c.conkey) WITH ORDINALITY k(n, i) \
                          JOIN pg_attribute a ON a.attrelid = c.conrelid AND a.attnum = k.n \
                          ORDER BY k.i), \
                    ARRAY(SELECT o.oprname::text FROM unnest(c.conexclop) WITH ORDINALITY x(op, i) \
                          JOIN pg_operator o ON o.oid = x.op ORDER BY x.i), \
                    f.relname::text, \
                    ARRAY(SELECT a.attname::text FROM unnest(c.confkey) WITH ORDINALITY k(n, i) \
                          JOIN pg_attribute a ON a.attrelid = c.confrelid AND a.attnum = k.n \
                          ORDER BY k.i) \
             FROM pg_constraint c \
             JOIN pg_class t ON t.oid = c.conrelid \
             LEFT JOIN pg_class f ON f.oid = c.confrelid \
             WHERE t.relnamespace = 'public'::regnamespace AND NOT t.relispartition \
               AND c.contype IN ('p', 'u', 'x', 'f') AND c.conparentid = 0 \
             ORDER BY 1, 2",
    )
    .fetch_all(db)
    .await
    .unwrap();
    rows.into_iter()
        .map(
            |(table, name, kind, columns, operators, referenced, referenced_columns)| Constraint {
                table,
                name,
                kind,
                columns,
                operators,
                references: referenced.map(|r| (r, referenced_columns)),
            },
        )
        .collect()
}

/// The tables of the schema (partitions count as their parent).
async fn tables(db: &PgPool) -> Vec<String> {
    sqlx::query_scalar(
        "SELECT relname::text FROM pg_class WHERE relnamespace = 'public'::regnamespace \
         AND relkind IN ('r', 'p') AND NOT relispartition ORDER BY 1",
    )
    .fetch_all(db)
    .await
    .unwrap()
}

/// Every way the catalog breaks Citus' rules for the placements; and a report line per
/// constraint checked.
async fn citus_violations(db: &PgPool) -> (Vec<String>, Vec<String>) {
    let placements = placements();
    let mut violations = Vec::new();
    let mut report = Vec::new();
    for table in tables(db).await {
        if !placements.contains_key(&table) && !LOCAL.contains(&table.as_str()) {
            violations.push(format!(
                "table {table} is neither distributed nor a reference table in deploy/citus.sql"
            ));
        }
    }
    let distributed = |table: &str| match placements.get(table) {
        Some(Placement::Distributed { column, .. }) => Some(column.clone()),
        _ => None,
    };
    // Co-location: every distributed table with the first one.
    let groups: HashSet<String> = placements
        .iter()
        .filter_map(|(table, p)| match p {
            Placement::Distributed { colocate_with, .. } => {
                Some(colocate_with.clone().unwrap_or_else(|| table.clone()))
            }
            Placement::Reference => None,
        })
        .collect();
    if groups.len() > 1 {
        violations.push(format!("distributed tables are not co-located: {groups:?}"));
    }
    for c in constraints(db).await {
        let what = format!("{}.{} ({})", c.table, c.name, c.kind);
        let placement = placements.get(&c.table);
        let verdict = match (placement, c.kind.as_str(), &c.references) {
            (Some(Placement::Distributed { column, .. }), "p" | "u", _) => {
                if c.columns.contains(column) {
                    Ok(format!("contains distribution column {column}"))
                } else {
                    Err(format!("does not contain distribution column {column}"))
                }
            }
            (Some(Placement::Distributed { column, .. }), "x", _) => {
                match c.columns.iter().position(|col| col == column) {
                    Some(i) if c.operators.get(i).map(String::as_str) == Some("=") => {
                        Ok(format!("{column} WITH ="))
                    }
                    Some(_) => Err(format!("uses {column} with an operator other than =")),
                    None => Err(format!("does not contain distribution column {column}")),
                }
            }
            (Some(Placement::Distributed { column, .. }), "f", Some((referenced, ref_cols))) => {
                match (placements.get(referenced), distributed(referenced)) {
                    (Some(Placement::Reference), _) => {
                        Ok(format!("references reference table {referenced}"))
                    }
                    (_, Some(ref_column)) => {
                        let paired = c
                            .columns
                            .iter()
                            .zip(ref_cols)
                            .any(|(a, b)| a == column && *b == ref_column);
                        if paired {
                            Ok(format!(
                                "{column} -> {referenced}.{ref_column} (co-located)"
                            ))
                        } else {
                            Err(format!(
                                "references distributed {referenced} without pairing \
                                 {column} with {referenced}.{ref_column}"
                            ))
                        }
                    }
                    _ => Err(format!("references local table {referenced}")),
                }
            }
            (Some(Placement::Reference), "f", Some((referenced, _))) => {
                match placements.get(referenced) {
                    Some(Placement::Reference) => {
                        Ok(format!("references reference table {referenced}"))
                    }
                    _ => Err(format!(
                        "a reference table may reference only reference tables, not {referenced}"
                    )),
                }
            }
            (Some(Placement::Reference), _, _) => Ok("reference table: any key".to_owned()),
            (None, _, _) => Ok("local table".to_owned()),
            (_, kind, _) => Err(format!("unexpected constraint kind {kind}")),
        };
        match verdict {
            Ok(why) => report.push(format!("ok   {what}: {why}")),
            Err(why) => {
                report.push(format!("FAIL {what}: {why}"));
                violations.push(format!("{what}: {why}"));
            }
        }
    }
    (violations, report)
}

#[tokio::test]
async fn the_schema_follows_the_citus_rules_for_its_distribution() {
    let db = fresh_database().await;
    let placements = placements();
    // The file declares what the issue asks: distributed by user id, co-located.
    for table in [
        "users",
        "participations",
        "ingest_streams",
        "sentiments",
        "events",
    ] {
        assert!(
            matches!(placements.get(table), Some(Placement::Distributed { .. })),
            "{table}: {placements:?}"
        );
    }
    let order = script_violations(&db, CITUS_SQL).await;
    assert!(order.is_empty(), "{order:#?}");
    let (violations, report) = citus_violations(&db).await;
    println!("Citus catalog check ({} constraints):", report.len());
    for line in &report {
        println!("  {line}");
    }
    assert!(violations.is_empty(), "{violations:#?}");
    for expected in [
        "participations.participations_no_overlap (x): user_id WITH =",
        "sentiments.sentiments_participation_fkey (f): user_id -> participations.user_id",
        "events.events_pkey (p): contains distribution column user_id",
        "users.users_external_id_fkey (f): references reference table user_external_ids",
    ] {
        assert!(
            report.iter().any(|line| line.contains(expected)),
            "not checked: {expected}"
        );
    }
}

#[tokio::test]
async fn the_catalog_check_finds_constraints_that_break_the_rules() {
    let db = fresh_database().await;
    for statement in [
        "ALTER TABLE participations ADD CONSTRAINT one_per_session UNIQUE (session_id, id)",
        "ALTER TABLE ingest_streams ADD CONSTRAINT ingest_streams_session_fkey \
             FOREIGN KEY (participation_id) REFERENCES participations (id)",
        "CREATE TABLE notes (user_id uuid PRIMARY KEY)",
        "ALTER TABLE sessions ADD COLUMN owner uuid REFERENCES users (id)",
    ] {
        // participations (id) needs a unique index to be referenced at all.
        if statement.contains("REFERENCES participations (id)") {
            sqlx::query("CREATE UNIQUE INDEX participations_id_key ON participations (id)")
                .execute(&db)
                .await
                .unwrap();
        }
        sqlx::query(statement).execute(&db).await.unwrap();
    }
    sqlx::query(
        "ALTER TABLE participations ADD CONSTRAINT no_two_open EXCLUDE USING gist \
             (user_id WITH <>, session_id WITH =)",
    )
    .execute(&db)
    .await
    .unwrap();
    let (violations, _) = citus_violations(&db).await;
    let joined = violations.join("\n");
    for expected in [
        "participations.one_per_session (u): does not contain distribution column user_id",
        "ingest_streams.ingest_streams_session_fkey (f): references distributed participations",
        "table notes is neither distributed nor a reference table",
        "sessions.sessions_owner_fkey (f): a reference table may reference only reference tables",
        "participations.no_two_open (x): uses user_id with an operator other than =",
    ] {
        assert!(
            joined.contains(expected),
            "missing {expected:?} in:\n{joined}"
        );
    }
    assert_eq!(violations.len(), 5, "{joined}");
}

#[tokio::test]
async fn the_script_check_finds_orders_that_citus_refuses() {
    let db = fresh_database().await;
    // The file as it was when a real Citus 13.2 cluster refused it: reference tables
    // first, with the conversion of local tables on.
    let without_setting: String = CITUS_SQL
        .lines()
        .filter(|line| !line.starts_with("SET citus.enable_local_reference_table_foreign_keys"))
        .map(|line| format!("{line}\n"))
        .collect();
    let found = script_violations(&db, &without_setting).await.join("\n");
    for expected in [
        "create_reference_table('timezones') while local table participations references it",
        "create_reference_table('sessions') while local table participations references it",
        "create_reference_table('user_external_ids') while local table users references it",
    ] {
        assert!(
            found.contains(expected),
            "missing {expected:?} in:\n{found}"
        );
    }
    // Distributing a table before the tables it references.
    let backwards = "SET citus.enable_local_reference_table_foreign_keys = off;\n\
        SELECT create_distributed_table('participations', 'user_id');\n\
        SELECT create_reference_table('timezones');\n";
    let found = script_violations(&db, backwards).await.join("\n");
    for expected in [
        "participations is made a Citus table while users, which it references, is not yet one",
        "participations is made a Citus table while timezones, which it references",
    ] {
        assert!(
            found.contains(expected),
            "missing {expected:?} in:\n{found}"
        );
    }
}

/// Records, per transaction, the user of every row written to the per-user tables.
async fn audit_writes(db: &PgPool) {
    for statement in [
        "CREATE TABLE write_audit (txid bigint NOT NULL, tbl text NOT NULL, user_id uuid)",
        "CREATE FUNCTION audit_write() RETURNS trigger LANGUAGE plpgsql AS $$ \
         BEGIN \
           INSERT INTO write_audit VALUES (txid_current(), TG_TABLE_NAME, \
             (to_jsonb(coalesce(NEW, OLD)) ->> TG_ARGV[0])::uuid); \
           RETURN NULL; \
         END $$",
    ] {
        sqlx::query(statement).execute(db).await.unwrap();
    }
    for (table, column) in [
        ("users", "id"),
        ("participations", "user_id"),
        ("ingest_streams", "user_id"),
        ("sentiments", "user_id"),
        ("events", "user_id"),
    ] {
        sqlx::query(&format!(
            "CREATE TRIGGER audit AFTER INSERT OR UPDATE OR DELETE ON {table} \
             FOR EACH ROW EXECUTE FUNCTION audit_write('{column}')"
        ))
        .execute(db)
        .await
        .unwrap();
    }
}

#[tokio::test]
async fn one_stream_writes_the_rows_of_one_user_only() {
    let db = fresh_database().await;
    audit_writes(&db).await;
    let app = spawn_app_on(db.clone()).await;
    // Five users, each with a participation; their streams run at the same time.
    let mut participations = Vec::new();
    for _ in 0..5 {
        participations.push(app.participation().await);
    }
    sqlx::query("TRUNCATE write_audit")
        .execute(&db)
        .await
        .unwrap();
    let calls: Vec<_> = participations
        .iter()
        .enumerate()
        .flat_map(|(i, p)| {
            let sentiments = frames::stream(
                &Uuid::new_v4().to_string(),
                &p.id,
                vec![
                    crate::helpers::sentiments(0, 1500),
                    crate::helpers::sentiments(1500, 1500),
                ],
            );
            let events = events_stream(&p.id, 40 + i);
            let (mut a, mut b) = (app.client.clone(), app.client.clone());
            [
                tokio::spawn(async move {
                    a.stream_sentiments(tokio_stream::iter(sentiments))
                        .await
                        .map(|_| ())
                }),
                tokio::spawn(async move {
                    b.stream_events(tokio_stream::iter(events))
                        .await
                        .map(|_| ())
                }),
            ]
        })
        .collect();
    for call in calls {
        call.await.unwrap().unwrap();
    }
    assert_eq!(count(&db, "SELECT count(*) FROM sentiments").await, 15_000);

    let per_tx: Vec<(i64, i64, i64)> = sqlx::query_as(
        "SELECT txid, count(DISTINCT user_id), count(*) FROM write_audit \
         GROUP BY txid ORDER BY txid",
    )
    .fetch_all(&db)
    .await
    .unwrap();
    println!("stream transactions (txid, users, rows): {per_tx:?}");
    assert_eq!(per_tx.len(), 10, "one transaction per stream: {per_tx:?}");
    for (txid, users, _) in &per_tx {
        assert_eq!(*users, 1, "transaction {txid} wrote rows of {users} users");
    }
    let null_users = count(
        &db,
        "SELECT count(*) FROM write_audit WHERE user_id IS NULL",
    )
    .await;
    assert_eq!(null_users, 0);
}

fn events_stream(participation_id: &str, n: usize) -> Vec<proto::StreamEventsRequest> {
    let events = (0..n as i64)
        .map(|i| proto::NewEvent {
            occurred_at: crate::helpers::at(crate::helpers::t0(), i),
            kind: proto::EventKind::TalkStarted as i32,
            attributes: Default::default(),
        })
        .collect();
    crate::helpers::event_frames::stream(
        &Uuid::new_v4().to_string(),
        participation_id,
        vec![events],
    )
}
