#!/usr/bin/env bash
# Make sure a PostgreSQL server runs on this machine for the tests, and print an admin URL for them
# (a role that may CREATE DATABASE; every test makes its own throwaway database and drops it).
# Debian's postgresql package is installed if missing; the cluster is created and started if needed.
# Usage: url=$(bash scripts/postgres.sh)
set -euo pipefail
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO=sudo
if ! ls /usr/lib/postgresql/*/bin/postgres >/dev/null 2>&1; then
  $SUDO apt-get update -q >&2
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends postgresql >&2
fi
version=$(ls /usr/lib/postgresql | sort -V | tail -1)
if ! pg_lsclusters -h | awk '{print $1" "$2}' | grep -qx "$version main"; then
  $SUDO pg_createcluster "$version" main >&2
fi
if ! pg_lsclusters -h | awk -v v="$version" '$1==v && $2=="main" {print $4}' | grep -q online; then
  $SUDO pg_ctlcluster "$version" main start >&2
fi
port=$(pg_lsclusters -h | awk -v v="$version" '$1==v && $2=="main" {print $3}')
as_postgres() { if [ "$(id -u)" -eq 0 ]; then runuser -u postgres -- "$@"; else sudo -u postgres "$@"; fi; }
for _ in $(seq 50); do as_postgres psql -p "$port" -qtAc "SELECT 1" >/dev/null 2>&1 && break; sleep 0.2; done
if [ "$(as_postgres psql -p "$port" -qtAc "SELECT 1 FROM pg_roles WHERE rolname = 'dicomnode'")" != "1" ]; then
  as_postgres psql -p "$port" -qc "CREATE ROLE dicomnode LOGIN CREATEDB PASSWORD 'dicomnode'" >&2
fi
echo "postgresql://dicomnode:dicomnode@127.0.0.1:$port/postgres"
