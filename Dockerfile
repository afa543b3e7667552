# pgdeltastream: docker build -t pgdeltastream . && docker run --net host -e PGHOST=... pgdeltastream
FROM denoland/deno:2.9.6

WORKDIR /app
# Dependencies first, so a source change does not re-download them. Only the server's own
# modules are cached: the embedded PostgreSQL of `deno task dev` is not in the image.
COPY deno.json deno.lock ./
COPY src/ ./src/
RUN deno install --frozen --entrypoint src/main.ts \
  && deno cache --frozen src/main.ts

# The image's default user; nothing under /app needs writing at run time.
USER deno

# Listen on every interface inside the container, on PORT if the platform sets one, else 12312.
ENV SERVERHOST=0.0.0.0
EXPOSE 12312

# The same narrow permissions and V8 flags as `deno task start` (see README); nothing is fetched
# at run time (--cached-only) and the lock file is not touched (--frozen).
CMD ["run", "--frozen", "--cached-only", "--v8-flags=--max-semi-space-size=2", "--allow-net", "--allow-env=DATABASE_URL,DBNAME,PGDATABASE,PGUSER,USER,PGPASS,PGPASSWORD,PGPASSFILE,HOME,PGHOST,PGPORT,PGSSLMODE,PGSSLNEGOTIATION,PGAPPNAME,PGCONNECT_TIMEOUT,PGCLIENT_ENCODING,PGOPTIONS,PGBINARY,PGREPLICATION,SERVERHOST,SERVERPORT,PORT,SNAPSHOT_TTL_SECONDS,SLOT_BUSY_TIMEOUT_SECONDS,PUBLICATION_PREFIX,FRAME_CHUNK_BYTES,NODE_PG_FORCE_NATIVE", "src/main.ts"]
