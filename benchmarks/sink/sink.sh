#!/bin/sh
# Start/stop the nginx + Lua discard S3 sink used by the peer benchmark.
#   sink.sh start PORT [PREFIX] [WORKERS]   install nginx-extras if missing, render the config, start nginx
#   sink.sh stop [PREFIX]                   stop the nginx started with PREFIX (by its pid file only)
#   sink.sh stats PORT                      print the counters (JSON)
#   sink.sh reset PORT                      forget every object and counter
set -eu
HERE=$(cd "$(dirname "$0")" && pwd)
cmd=${1:-}

# GET (or POST with a second argument) with curl, or python3 where curl is missing
fetch() {
    if command -v curl >/dev/null 2>&1; then
        if [ -n "${2:-}" ]; then curl -fsS -X POST "$1"; else curl -fsS "$1"; fi
    else
        method=GET
        if [ -n "${2:-}" ]; then method=POST; fi
        python3 -c 'import sys, urllib.request as u
r = u.urlopen(u.Request(sys.argv[1], method=sys.argv[2]), timeout=5); sys.stdout.write(r.read().decode())' \
            "$1" "$method"
    fi
}
case "$cmd" in
start)
    port=${2:?port}
    prefix=${3:-/tmp/asyncdepo-sink-$port}
    workers=${4:-1}
    if [ ! -e /usr/lib/nginx/modules/ngx_http_lua_module.so ] || ! command -v nginx >/dev/null 2>&1; then
        echo "sink: installing nginx-extras (nginx + Lua) with apt-get" >&2
        DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends nginx-extras >&2
    fi
    mkdir -p "$prefix/body" "$prefix/logs"
    sed -e "s#@PREFIX@#$prefix#g" -e "s#@PORT@#$port#g" -e "s#@WORKERS@#$workers#g" \
        -e "s#@LUA@#$HERE/s3sink.lua#g" "$HERE/nginx.conf.in" > "$prefix/nginx.conf"
    nginx -p "$prefix" -c "$prefix/nginx.conf" -e "$prefix/error.log"
    # bounded readiness poll: the port answers /_sink/stats
    i=0
    while [ $i -lt 100 ]; do
        if fetch "http://127.0.0.1:$port/_sink/stats" >/dev/null 2>&1; then
            echo "sink: listening on http://127.0.0.1:$port (prefix $prefix, pid $(cat "$prefix/nginx.pid"))"
            exit 0
        fi
        i=$((i + 1))
        sleep 0.05
    done
    echo "sink: nginx did not answer on port $port; see $prefix/error.log" >&2
    exit 1
    ;;
stop)
    prefix=${2:?prefix}
    if [ -f "$prefix/nginx.pid" ]; then
        nginx -p "$prefix" -c "$prefix/nginx.conf" -e "$prefix/error.log" -s quit
    fi
    ;;
stats)
    fetch "http://127.0.0.1:${2:?port}/_sink/stats"; echo
    ;;
reset)
    fetch "http://127.0.0.1:${2:?port}/_sink/reset" post
    ;;
*)
    echo "usage: $0 start PORT [PREFIX] [WORKERS] | stop PREFIX | stats PORT | reset PORT" >&2
    exit 2
    ;;
esac
