# pgdeltastream: docker build -t pgdeltastream . && docker run --net host -e PGHOST=... pgdeltastream
FROM denoland/deno:2.9.6

WORKDIR /app
# The server's npm packages, in a layer of their own that only deno.json and deno.lock invalidate:
# a source change does not re-install them. The dev- and test-only packages (the embedded
# PostgreSQL of `deno task dev`, the browser driver) are dropped from the imports first, so the
# image does not carry them; every package left keeps the version and integrity the lock records.
COPY deno.json deno.lock ./
RUN deno eval --no-config 'const c = JSON.parse(Deno.readTextFileSync("deno.json")); \
      for (const k of Object.keys(c.imports)) if (/embedded-postgres|playwright/.test(k)) delete c.imports[k]; \
      Deno.writeTextFileSync("deno.json", JSON.stringify(c, null, 2));' \
  && deno install
COPY src/ ./src/
RUN deno cache --frozen src/launch.ts src/main.ts

# The image's default user; nothing under /app needs writing at run time.
USER deno

# Listen on every interface inside the container, on PORT if the platform sets one, else 12312.
# Clients from outside the container are not on its loopback: protected mode refuses them until
# ADMIN_TOKENS, JWT_SECRET or JWKS_URL is set (or AUTH=none, for private networks only).
ENV SERVERHOST=0.0.0.0
EXPOSE 12312

# As deno task start: large allocations (websocket frames) always get their own mapping, returned
# when freed, instead of glibc raising its threshold and keeping them in a growing heap.
ENV MALLOC_MMAP_THRESHOLD_=131072

# Healthy while the server answers and reaches its database (/healthz is 503 when it cannot).
HEALTHCHECK --interval=30s --timeout=5s --start-period=20s --retries=3 \
  CMD ["deno", "eval", "--no-config", "const port = Deno.env.get('SERVERPORT') || Deno.env.get('PORT') || '12312'; const r = await fetch(`http://127.0.0.1:${port}/healthz`).catch(() => undefined); await r?.body?.cancel(); Deno.exit(r?.ok ? 0 : 1);"]

# As `deno task start`: the launcher reads the configuration and runs the server with exactly the
# permissions it needs (the network, its environment variables, and only the certificate, key,
# password and socket paths its database settings name); nothing is fetched at run time
# (--cached-only) and the lock file is not touched (--frozen), for the server too.
CMD ["run", "--frozen", "--cached-only", "--allow-env=DATABASE_URL,DBNAME,PGDATABASE,PGUSER,USER,PGPASS,PGPASSWORD,PGPASSFILE,HOME,PGHOST,PGPORT,PGSSLMODE,PGSSLROOTCERT,PGSSLCERT,PGSSLKEY,PGSSLNEGOTIATION,PGTARGETSESSIONATTRS,PGLOADBALANCEHOSTS,PGAPPNAME,PGCONNECT_TIMEOUT,PGCLIENT_ENCODING,PGOPTIONS,PGBINARY,PGREPLICATION,SERVERHOST,SERVERPORT,PORT,SNAPSHOT_TTL_SECONDS,SLOT_BUSY_TIMEOUT_SECONDS,PUBLICATION_PREFIX,FRAME_CHUNK_BYTES,EXPORT_READERS,SNAPSHOT_READERS,AUTH,ADMIN_TOKENS,ADMIN_TOKEN,JWT_SECRET,JWKS_URL,JWT_AUDIENCE,JWT_ISSUER,CORS_ORIGINS,NODE_PG_FORCE_NATIVE,LOG_FORMAT,LOG_LEVEL,METRICS,METRICS_TOKEN,STREAM_MAX_LAG_BYTES,STREAM_MAX_IDLE_SECONDS,WAL_GUARD_INTERVAL_SECONDS,NATS_URL,RELAY_MAX_AGE_SECONDS,RELAY_MAX_BYTES,RELAY_MAX_MESSAGES,RELAY_REPLICAS,RELAY_INSTANCE,REPLICATION_TIMEOUT_SECONDS,BACKFILL_CHUNK_ROWS", "--allow-run=deno", "src/launch.ts", "--frozen", "--cached-only"]
