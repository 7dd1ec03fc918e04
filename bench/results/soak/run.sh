#!/bin/bash
# Issue 19 soak: 20 minutes against an AFD 1A2F fp32 server (shm transport), one FFN worker killed at minute 10.
set -u
cd /work/main
OUT=${OUT:-/tmp/soak}
.venv/bin/afdserve serve --model smollm2 --dtype float32 --afd 1A2F --afd-transport shm --host 127.0.0.1 --port 8011 \
  > $OUT/server.log 2>&1 &
SPID=$!
for i in $(seq 1 240); do curl -sf http://127.0.0.1:8011/health >/dev/null && break; sleep 1; done
echo "server up after ${i}s pid $SPID"
.venv/bin/afdserve bench soak --base-url http://127.0.0.1:8011 --server-pid $SPID --minutes 20 --kill-at-minute 10 \
  --concurrency 6 --json $OUT/soak-afd1a2f-fp32-20min.json > $OUT/soak.txt 2>&1
echo "soak rc $?"
kill -TERM $SPID; wait $SPID; echo "server exit $?"
sleep 3; ps aux | grep -c '[r]ay::' 
