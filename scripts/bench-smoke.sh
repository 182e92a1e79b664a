#!/usr/bin/env bash
# A ~10-second check that the load generator and ssegate agree (for CI): 300 connections in two
# worker processes, users + groups + topics + broadcast, 500 publishes/s for 3 s; fails unless
# every connection opened and nothing was lost, duplicated or misrouted.
#
#   ./scripts/bench-smoke.sh
source "$(dirname "$0")/bench-common.sh"
build
start_server ssegate
line=$(bench ssegate smoke --connections 300 --conns-per-worker 150 --users 100 --groups 3 --topics 2 \
  --to user,group,topic,broadcast --rate 500 --duration 3s --drain 5s --settle 200ms --json-only)
stop_server
for check in '"connections":300,' '"lost":0,' '"duplicated":0,' '"misrouted":0,' '"closed_early":0,' '"publish_errors":0,'; do
  case $line in *"$check"*) ;; *) die "smoke run failed ($check expected): $line" ;; esac
done
case $line in *'"delivered":0,'*) die "smoke run delivered nothing: $line" ;; esac
log "bench smoke ok"
