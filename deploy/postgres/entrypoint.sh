#!/bin/sh
# Creates the cluster on first start (superuser password from POSTGRES_PASSWORD_FILE,
# SCRAM password logins from the network), then runs the server in the foreground.
set -eu
bin=$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -n 1)
if [ ! -s "$PGDATA/PG_VERSION" ]; then
  "$bin/initdb" -D "$PGDATA" -U postgres -E UTF8 --locale=C \
    --auth-local=peer --auth-host=scram-sha-256 --pwfile="$POSTGRES_PASSWORD_FILE"
  echo "host all all all scram-sha-256" >> "$PGDATA/pg_hba.conf"
fi
exec "$bin/postgres" -D "$PGDATA" -c listen_addresses='*' \
  -c unix_socket_directories=/tmp -c password_encryption=scram-sha-256
