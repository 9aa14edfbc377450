#!/usr/bin/env bash
# What a batch of unary records costs on Citus by how it is cut: one statement for the
# calls of many users on both workers (Citus commits it with two-phase commit), one per
# worker (still two-phase: several shards), or one per shard (a plain commit). Run against
# a coordinator whose database has the schema distributed (docs/SCALING.md, section 3),
# e.g. the cluster of ../shared/citus/README.md; it adds 128 users of its own and writes
# sentiments for them. Prints rows/s and the mean latency of each round, with pgbench.
#
#   bench/citus/batch-commit.sh postgres://postgres@127.0.0.1:9700/krisp [seconds] [rounds]
set -euo pipefail
url=${1:?coordinator URL}
seconds=${2:-15}
rounds=${3:-3}
pgbench=$(command -v pgbench || ls /usr/lib/postgresql/*/bin/pgbench | sort -V | tail -n 1)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
sql() { psql -X -q -At -v ON_ERROR_STOP=1 -d "$url" "$@"; }

tag=$(sql -c "SELECT substr(md5(random()::text), 1, 8)")
session=$(sql -c "SELECT gen_random_uuid()")
sql <<SQL
INSERT INTO timezones VALUES ('UTC', 0) ON CONFLICT DO NOTHING;
INSERT INTO sessions (id, session_type, started_at) VALUES ('$session', 'webinar', '2026-01-01');
CREATE TEMP TABLE new_users AS SELECT gen_random_uuid() AS id, g FROM generate_series(1, 128) g;
INSERT INTO user_external_ids SELECT 'batch-$tag-' || g, id FROM new_users;
INSERT INTO users (id, external_id) SELECT id, 'batch-$tag-' || g FROM new_users;
INSERT INTO participations (id, user_id, session_id, timezone_code, connected_at)
    SELECT id, id, '$session', 'UTC', '2026-01-01' FROM new_users;
SQL
# Each user with its shard and worker (the participation's id is the user's).
sql -F ' ' -c "SELECT u.user_id, s.shardid, s.nodeport FROM user_external_ids u
    JOIN citus_shards s ON s.table_name = 'users'::regclass
     AND s.shardid = get_shard_id_for_distribution_column('users', u.user_id)
    WHERE u.external_id LIKE 'batch-$tag-%' ORDER BY 1" >"$work/users"

insert() { # users... -> one INSERT of a sentiment for each
  local values="" id
  for id in "$@"; do
    values="$values${values:+, }(gen_random_uuid(), '$id', '$id', now(), now() + interval '1 s', 'neutral', 0.1)"
  done
  echo "INSERT INTO sentiments (id, user_id, participation_id, started_at, ended_at, label, score) VALUES $values;"
}
ports=$(cut -d' ' -f3 "$work/users" | sort -u)
spanning=()
for port in $ports; do
  mapfile -t ids < <(awk -v p="$port" '$3 == p {print $1}' "$work/users" | head -n 16)
  spanning+=("${ids[@]}")
  insert "${ids[@]}" >"$work/worker-$port.sql"
done
insert "${spanning[@]}" >"$work/spanning.sql"
for shard in $(cut -d' ' -f2 "$work/users" | sort | uniq -c | awk '$1 >= 4 {print $2}' | head -n 8); do
  mapfile -t ids < <(awk -v s="$shard" '$2 == s {print $1}' "$work/users" | head -n 4)
  insert "${ids[@]}" >"$work/shard-$shard.sql"
done

run() { # name rows-per-transaction clients scripts...
  local name=$1 rows=$2 clients=$3; shift 3
  local out tps latency
  out=$("$pgbench" -n -T "$seconds" -j 2 -c "$clients" "$@" "$url" 2>&1)
  tps=$(awk '/^tps/ {print $3}' <<<"$out")
  latency=$(awk '/^latency average/ {print $4}' <<<"$out")
  printf '%-34s %6d rows/s  %7s ms\n' "$name" "$(awk -v t="$tps" -v r="$rows" 'BEGIN {printf "%d", t * r}')" "$latency"
}
worker_scripts=(); for f in "$work"/worker-*.sql; do worker_scripts+=(-f "$f"); done
shard_scripts=(); for f in "$work"/shard-*.sql; do shard_scripts+=(-f "$f"); done
for round in $(seq "$rounds"); do
  echo "round $round"
  run "32 users on 2 workers (2PC)" 32 16 -f "$work/spanning.sql"
  run "16 users on 1 worker (2PC)" 16 16 "${worker_scripts[@]}"
  run "4 users on 1 shard (1PC)" 4 16 "${shard_scripts[@]}"
done
