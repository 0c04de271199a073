# Sourced by the measuring scripts: drop_prefix PORT DB PREFIX drops what `ferry migrate`
# made under PREFIX in database DB of the PostgreSQL at 127.0.0.1:PORT: its tables and
# functions, and log capture's publication and slot (a slot left behind pins the server's
# WAL; it stays active until the relay's walsender has exited, so the drop is tried for up
# to 10 s).
drop_prefix() {
  local port=$1 db=$2 prefix=$3
  local sql=(psql -qtA -h 127.0.0.1 -p "$port" -U postgres -d "$db" -c)
  "${sql[@]}" "DO \$\$DECLARE t record; BEGIN FOR t IN SELECT tablename FROM pg_tables WHERE tablename LIKE '${prefix}%' LOOP EXECUTE 'DROP TABLE ' || t.tablename || ' CASCADE'; END LOOP; END\$\$" >/dev/null
  "${sql[@]}" "DO \$\$DECLARE f record; BEGIN FOR f IN SELECT oid::regprocedure AS signature FROM pg_proc WHERE proname LIKE '${prefix}%' LOOP EXECUTE 'DROP FUNCTION ' || f.signature || ' CASCADE'; END LOOP; END\$\$" >/dev/null
  "${sql[@]}" "SET client_min_messages = warning; DROP PUBLICATION IF EXISTS ${prefix}outbox" >/dev/null
  for _ in $(seq 50); do
    [ "$("${sql[@]}" "SELECT count(*) FROM pg_replication_slots WHERE slot_name = '${prefix}outbox'")" = 0 ] && return
    "${sql[@]}" "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE slot_name = '${prefix}outbox' AND NOT active" >/dev/null
    sleep 0.2
  done
}
