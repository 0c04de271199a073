// Debezium's embedded engine as an outbox relay, for comparison with ferry (BENCHMARKS.md).
//
// PostgreSQL connector (pgoutput) tails ferry's outbox table, the outbox EventRouter SMT turns
// each inserted row into a record for topic <topic_prefix>.<aggregate_type>, and a KafkaProducer
// (acks=all, idempotent) publishes it. Debezium's offsets, and so the slot's confirmed LSN, are
// marked only after every record of the batch was acknowledged by the broker: the same
// at-least-once contract a Debezium user gets from Kafka Connect.
//
// Modes:
//   drain N          stream a backlog of N rows already in the outbox (the slot must exist
//                    from before they were inserted) and report the rate from first to last ack
//   live RATE SECS   offer RATE rows/s for SECS seconds, one row per transaction through
//                    ferry_enqueue on producer connections, and report commit→ack latency
//
// Settings come from environment variables (see usage()); scripts/debezium-bench.sh sets them.

import io.debezium.engine.DebeziumEngine;
import io.debezium.engine.RecordChangeEvent;
import io.debezium.engine.format.ChangeEventFormat;
import io.debezium.embedded.Connect;

import org.apache.kafka.clients.admin.Admin;
import org.apache.kafka.clients.admin.NewTopic;
import org.apache.kafka.clients.producer.KafkaProducer;
import org.apache.kafka.clients.producer.ProducerConfig;
import org.apache.kafka.clients.producer.ProducerRecord;
import org.apache.kafka.common.errors.TopicExistsException;
import org.apache.kafka.common.serialization.ByteArraySerializer;
import org.apache.kafka.connect.header.Header;
import org.apache.kafka.connect.source.SourceRecord;

import java.lang.management.ManagementFactory;
import java.nio.ByteBuffer;
import java.nio.charset.StandardCharsets;
import java.nio.file.Files;
import java.nio.file.Path;
import java.sql.Connection;
import java.sql.DriverManager;
import java.sql.PreparedStatement;
import java.sql.ResultSet;
import java.time.Instant;
import java.util.ArrayList;
import java.util.Arrays;
import java.util.List;
import java.util.Properties;
import java.util.concurrent.CompletableFuture;
import java.util.concurrent.CountDownLatch;
import java.util.concurrent.ExecutorService;
import java.util.concurrent.Executors;
import java.util.concurrent.Future;
import java.util.concurrent.TimeUnit;
import java.util.concurrent.atomic.AtomicLong;
import java.util.concurrent.atomic.AtomicReference;

public final class DebeziumOutboxBench {

    /** Aggregate type of the rows the bench produces; routes to topic <prefix>.order. */
    private static final String AGGREGATE_TYPE = "order";

    public static void main(String[] args) throws Exception {
        if (args.length < 2) {
            usage();
        }
        String mode = args[0];
        Settings settings = Settings.fromEnv();
        switch (mode) {
            case "drain" -> drain(settings, Long.parseLong(args[1]));
            case "live" -> {
                if (args.length < 3) {
                    usage();
                }
                live(settings, Integer.parseInt(args[1]), Integer.parseInt(args[2]));
            }
            default -> usage();
        }
        // The engine's and the producer's non-daemon threads are closed; exit promptly anyway.
        System.exit(0);
    }

    private static void usage() {
        System.err.println("""
            usage: DebeziumOutboxBench drain N | live RATE SECONDS
            environment:
              BENCH_PG_HOST, BENCH_PG_PORT, BENCH_PG_DB, BENCH_PG_USER   PostgreSQL (wal_level=logical)
              BENCH_SLOT, BENCH_PUBLICATION   logical slot and publication, created beforehand
              BENCH_TABLE                     outbox table, e.g. public.ferry_outbox
              BENCH_BROKERS                   Kafka bootstrap servers, e.g. 127.0.0.1:9092
              BENCH_TOPIC_PREFIX              records go to <prefix>.<aggregate_type>
              BENCH_STATE_DIR                 where the engine keeps its offset file
              BENCH_PRODUCERS                 live mode: producer connections (default 8)
              BENCH_ENGINE_EXTRA              extra engine properties, k=v,k=v (default: Debezium's own)""");
        System.exit(2);
    }

    record Settings(String pgHost, String pgPort, String pgDb, String pgUser, String slot,
                    String publication, String table, String brokers, String topicPrefix,
                    Path stateDir, int producers) {
        static Settings fromEnv() {
            return new Settings(env("BENCH_PG_HOST", "127.0.0.1"), env("BENCH_PG_PORT", "5434"),
                env("BENCH_PG_DB", "ferry_bench_debezium"), env("BENCH_PG_USER", "postgres"),
                env("BENCH_SLOT", "dbz_bench"), env("BENCH_PUBLICATION", "dbz_bench"),
                env("BENCH_TABLE", "public.ferry_outbox"), env("BENCH_BROKERS", "127.0.0.1:9092"),
                env("BENCH_TOPIC_PREFIX", "dbz-bench"), Path.of(env("BENCH_STATE_DIR", "/tmp/dbz-bench")),
                Integer.parseInt(env("BENCH_PRODUCERS", "8")));
        }

        String jdbcUrl() {
            return "jdbc:postgresql://" + pgHost + ":" + pgPort + "/" + pgDb + "?user=" + pgUser;
        }

        String topic() {
            return topicPrefix + "." + AGGREGATE_TYPE;
        }
    }

    private static String env(String name, String fallback) {
        String value = System.getenv(name);
        return value == null || value.isEmpty() ? fallback : value;
    }

    /** Per-ack bookkeeping shared by the engine's consumer thread and the producer callbacks. */
    static final class Acks {
        final AtomicLong count = new AtomicLong();
        final AtomicLong firstAckNanos = new AtomicLong();
        final AtomicLong lastAckNanos = new AtomicLong();
        /** commit→ack latencies in microseconds, only recorded while `recording` is set. */
        final long[] latenciesMicros;
        final AtomicLong recorded = new AtomicLong();
        volatile boolean recording;
        final AtomicReference<Exception> failure = new AtomicReference<>();

        Acks(int latencyCapacity) {
            latenciesMicros = new long[latencyCapacity];
        }

        void acked(Instant createdAt) {
            long now = System.nanoTime();
            firstAckNanos.compareAndSet(0, now);
            lastAckNanos.set(now);
            count.incrementAndGet();
            if (recording && createdAt != null) {
                Instant ackedAt = Instant.now();
                long micros = (ackedAt.getEpochSecond() - createdAt.getEpochSecond()) * 1_000_000L
                    + (ackedAt.getNano() - createdAt.getNano()) / 1_000L;
                long slot = recorded.getAndIncrement();
                if (slot < latenciesMicros.length) {
                    latenciesMicros[(int) slot] = micros;
                }
            }
        }
    }

    /** Publishes each batch the engine hands over and marks it processed once all are acked. */
    static final class PublishingConsumer
        implements DebeziumEngine.ChangeConsumer<RecordChangeEvent<SourceRecord>> {
        private final KafkaProducer<byte[], byte[]> producer;
        private final Acks acks;

        PublishingConsumer(KafkaProducer<byte[], byte[]> producer, Acks acks) {
            this.producer = producer;
            this.acks = acks;
        }

        @Override
        public void handleBatch(List<RecordChangeEvent<SourceRecord>> records,
                                DebeziumEngine.RecordCommitter<RecordChangeEvent<SourceRecord>> committer)
            throws InterruptedException {
            List<Future<?>> sent = new ArrayList<>(records.size());
            for (RecordChangeEvent<SourceRecord> event : records) {
                SourceRecord record = event.record();
                if (record.topic() == null || record.value() == null) {
                    continue; // heartbeats and tombstones the router leaves
                }
                Instant createdAt = createdAt(record);
                ProducerRecord<byte[], byte[]> out = new ProducerRecord<>(record.topic(), null,
                    bytes(record.key()), bytes(record.value()));
                for (Header header : record.headers()) {
                    out.headers().add(header.key(), bytes(header.value()));
                }
                sent.add(producer.send(out, (metadata, error) -> {
                    if (error != null) {
                        acks.failure.compareAndSet(null, error);
                    } else {
                        acks.acked(createdAt);
                    }
                }));
            }
            for (Future<?> future : sent) {
                try {
                    future.get();
                } catch (java.util.concurrent.ExecutionException e) {
                    // Not marking the batch: the engine stops and the slot replays it on restart.
                    throw new IllegalStateException("broker refused a record: " + e.getCause(), e.getCause());
                }
            }
            for (RecordChangeEvent<SourceRecord> event : records) {
                committer.markProcessed(event);
            }
            committer.markBatchFinished();
        }

        private static Instant createdAt(SourceRecord record) {
            Header header = record.headers().lastWithName("created_at");
            if (header == null || header.value() == null) {
                return null;
            }
            Object value = header.value();
            if (value instanceof Long micros) { // time.precision.mode=connect: not used, kept exact
                return Instant.EPOCH.plusNanos(micros * 1_000L);
            }
            return Instant.parse(value.toString());
        }

        private static byte[] bytes(Object value) {
            if (value == null) {
                return null;
            }
            if (value instanceof byte[] raw) {
                return raw;
            }
            if (value instanceof ByteBuffer buffer) {
                byte[] raw = new byte[buffer.remaining()];
                buffer.duplicate().get(raw);
                return raw;
            }
            return value.toString().getBytes(StandardCharsets.UTF_8);
        }
    }

    private static Properties engineProperties(Settings s) {
        Properties p = new Properties();
        p.setProperty("name", "ferry-outbox-bench");
        p.setProperty("connector.class", "io.debezium.connector.postgresql.PostgresConnector");
        p.setProperty("offset.storage", "org.apache.kafka.connect.storage.FileOffsetBackingStore");
        p.setProperty("offset.storage.file.filename", s.stateDir().resolve("offsets.dat").toString());
        p.setProperty("offset.flush.interval.ms", "1000");
        p.setProperty("database.hostname", s.pgHost());
        p.setProperty("database.port", s.pgPort());
        p.setProperty("database.user", s.pgUser());
        p.setProperty("database.password", "");
        p.setProperty("database.dbname", s.pgDb());
        p.setProperty("topic.prefix", s.topicPrefix());
        p.setProperty("plugin.name", "pgoutput");
        p.setProperty("slot.name", s.slot());
        p.setProperty("publication.name", s.publication());
        p.setProperty("publication.autocreate.mode", "disabled");
        p.setProperty("table.include.list", s.table());
        p.setProperty("snapshot.mode", "no_data");
        p.setProperty("binary.handling.mode", "bytes");
        p.setProperty("transforms", "outbox");
        p.setProperty("transforms.outbox.type", "io.debezium.transforms.outbox.EventRouter");
        p.setProperty("transforms.outbox.table.field.event.id", "id");
        p.setProperty("transforms.outbox.table.field.event.key", "partition_key");
        p.setProperty("transforms.outbox.table.field.event.payload", "payload");
        p.setProperty("transforms.outbox.route.by.field", "aggregate_type");
        p.setProperty("transforms.outbox.route.topic.replacement", s.topicPrefix() + ".${routedByValue}");
        p.setProperty("transforms.outbox.table.fields.additional.placement",
            "event_type:header:event_type,aggregate_id:header:aggregate_id,"
                + "version:header:version,created_at:header:created_at");
        // Tuning a user would try (e.g. poll.interval.ms=10), as key=value pairs split by commas.
        for (String pair : env("BENCH_ENGINE_EXTRA", "").split(",")) {
            int eq = pair.indexOf('=');
            if (eq > 0) {
                p.setProperty(pair.substring(0, eq).trim(), pair.substring(eq + 1).trim());
            }
        }
        return p;
    }

    private static KafkaProducer<byte[], byte[]> producer(Settings s) {
        Properties p = new Properties();
        p.setProperty(ProducerConfig.BOOTSTRAP_SERVERS_CONFIG, s.brokers());
        p.setProperty(ProducerConfig.ACKS_CONFIG, "all");
        p.setProperty(ProducerConfig.ENABLE_IDEMPOTENCE_CONFIG, "true");
        p.setProperty("max.in.flight.requests.per.connection", "5");
        p.setProperty(ProducerConfig.LINGER_MS_CONFIG, "5");
        p.setProperty(ProducerConfig.COMPRESSION_TYPE_CONFIG, "lz4");
        p.setProperty(ProducerConfig.CLIENT_ID_CONFIG, "ferry-debezium-bench");
        return new KafkaProducer<>(p, new ByteArraySerializer(), new ByteArraySerializer());
    }

    private static void createTopic(Settings s) throws Exception {
        Properties p = new Properties();
        p.setProperty("bootstrap.servers", s.brokers());
        try (Admin admin = Admin.create(p)) {
            admin.createTopics(List.of(new NewTopic(s.topic(), 16, (short) 1))).all().get(30, TimeUnit.SECONDS);
        } catch (java.util.concurrent.ExecutionException e) {
            if (!(e.getCause() instanceof TopicExistsException)) {
                throw e;
            }
        }
    }

    /** Deletes the run's topic: the shared broker keeps its records in memory. */
    private static void deleteTopic(Settings s) throws Exception {
        Properties p = new Properties();
        p.setProperty("bootstrap.servers", s.brokers());
        try (Admin admin = Admin.create(p)) {
            admin.deleteTopics(List.of(s.topic())).all().get(30, TimeUnit.SECONDS);
        }
    }

    /** A running engine with its producer; close() stops both and deletes the run's topic. */
    static final class Relay implements AutoCloseable {
        final Acks acks;
        private final Settings settings;
        private final KafkaProducer<byte[], byte[]> producer;
        private final DebeziumEngine<RecordChangeEvent<SourceRecord>> engine;
        private final ExecutorService executor = Executors.newSingleThreadExecutor();
        private final CountDownLatch stopped = new CountDownLatch(1);
        final AtomicReference<Throwable> engineError = new AtomicReference<>();

        Relay(Settings s, Acks acks) throws Exception {
            this.settings = s;
            this.acks = acks;
            Files.createDirectories(s.stateDir());
            createTopic(s);
            producer = producer(s);
            engine = DebeziumEngine.create(ChangeEventFormat.of(Connect.class))
                .using(engineProperties(s))
                .notifying(new PublishingConsumer(producer, acks))
                .using((success, message, error) -> {
                    if (!success) {
                        engineError.compareAndSet(null, error != null ? error : new IllegalStateException(message));
                    }
                    stopped.countDown();
                })
                .build();
            executor.execute(engine);
        }

        void check() {
            Throwable error = engineError.get();
            if (error != null) {
                throw new IllegalStateException("Debezium engine stopped: " + error, error);
            }
            Exception failure = acks.failure.get();
            if (failure != null) {
                throw new IllegalStateException("broker refused a record: " + failure, failure);
            }
            if (stopped.getCount() == 0) {
                throw new IllegalStateException("Debezium engine stopped unexpectedly");
            }
        }

        /** Waits until `target` acks, failing if the engine dies or nothing moves for `idleSecs`. */
        void awaitAcks(long target, int idleSecs) throws InterruptedException {
            long last = -1;
            long lastMoved = System.nanoTime();
            while (acks.count.get() < target) {
                check();
                long now = acks.count.get();
                if (now != last) {
                    last = now;
                    lastMoved = System.nanoTime();
                } else if (System.nanoTime() - lastMoved > TimeUnit.SECONDS.toNanos(idleSecs)) {
                    throw new IllegalStateException("stalled at " + now + " of " + target + " acks for "
                        + idleSecs + " s: is the slot created before the rows, and the publication on the table?");
                }
                Thread.sleep(20);
            }
        }

        @Override
        public void close() throws Exception {
            engine.close();
            executor.shutdown();
            executor.awaitTermination(30, TimeUnit.SECONDS);
            producer.close();
            deleteTopic(settings);
        }
    }

    private static void drain(Settings s, long rows) throws Exception {
        long started = System.nanoTime();
        Acks acks = new Acks(0);
        try (Relay relay = new Relay(s, acks)) {
            relay.awaitAcks(rows, 120);
            long first = acks.firstAckNanos.get();
            long last = acks.lastAckNanos.get();
            double window = (last - first) / 1e9;
            double sinceStart = (last - started) / 1e9;
            System.out.printf("debezium drain: %d rows acked; first→last ack %.2f s = %.0f msg/s; "
                    + "engine start→last ack %.2f s = %.0f msg/s%n",
                acks.count.get(), window, (acks.count.get() - 1) / window, sinceStart,
                acks.count.get() / sinceStart);
        }
        printResources();
    }

    private static void live(Settings s, int rate, int seconds) throws Exception {
        Acks acks = new Acks(rate * seconds + 16);
        try (Relay relay = new Relay(s, acks)) {
            // One row through the whole path first: the engine is then streaming, not starting.
            try (Connection c = DriverManager.getConnection(s.jdbcUrl())) {
                enqueue(c.prepareStatement(enqueueSql(s)), "warmup", 0);
            }
            relay.awaitAcks(1, 120);
            long before = acks.count.get();
            acks.recording = true;

            int producers = Math.max(1, Math.min(s.producers(), rate));
            long perProducer = (long) rate * seconds / producers;
            long intervalNanos = TimeUnit.SECONDS.toNanos(1) * producers / rate;
            AtomicLong committed = new AtomicLong();
            ExecutorService pool = Executors.newFixedThreadPool(producers);
            List<CompletableFuture<Void>> running = new ArrayList<>();
            long t0 = System.nanoTime();
            for (int p = 0; p < producers; p++) {
                final int producer = p;
                running.add(CompletableFuture.runAsync(() -> {
                    try (Connection c = DriverManager.getConnection(s.jdbcUrl())) {
                        PreparedStatement st = c.prepareStatement(enqueueSql(s));
                        // Open loop: each row has a due time; a late producer sends at once.
                        long offset = intervalNanos * producer / producers;
                        for (long i = 0; i < perProducer; i++) {
                            long due = t0 + offset + i * intervalNanos;
                            long wait = due - System.nanoTime();
                            if (wait > 0) {
                                TimeUnit.NANOSECONDS.sleep(wait);
                            }
                            enqueue(st, "p" + producer + "-" + (i % 1000), i);
                            committed.incrementAndGet();
                        }
                    } catch (Exception e) {
                        throw new IllegalStateException("producer " + producer + ": " + e, e);
                    }
                }, pool));
            }
            CompletableFuture.allOf(running.toArray(CompletableFuture[]::new)).join();
            double produceSecs = (System.nanoTime() - t0) / 1e9;
            pool.shutdown();
            relay.awaitAcks(before + committed.get(), 60);
            acks.recording = false;

            int n = (int) Math.min(acks.recorded.get(), acks.latenciesMicros.length);
            long[] sorted = Arrays.copyOf(acks.latenciesMicros, n);
            Arrays.sort(sorted);
            System.out.printf("debezium live: offered %d msg/s for %d s on %d connections; committed %d rows "
                    + "in %.2f s = %.0f msg/s achieved%n", rate, seconds, producers, committed.get(),
                produceSecs, committed.get() / produceSecs);
            System.out.printf("debezium live: commit→ack latency over %d rows: p50 %.2f ms, p99 %.2f ms, "
                    + "p99.9 %.2f ms, max %.2f ms%n", n, pct(sorted, 50), pct(sorted, 99), pct(sorted, 99.9),
                n == 0 ? 0 : sorted[n - 1] / 1000.0);
        }
        printResources();
    }

    private static String enqueueSql(Settings s) {
        String table = s.table();
        String schema = table.contains(".") ? table.substring(0, table.indexOf('.') + 1) : "";
        String prefix = table.substring(schema.length(), table.length() - "outbox".length());
        return "SELECT message_sequence FROM " + schema + prefix + "enqueue(?, ?, ?, ?::jsonb)";
    }

    private static void enqueue(PreparedStatement st, String aggregateId, long n) throws Exception {
        st.setString(1, AGGREGATE_TYPE);
        st.setString(2, aggregateId);
        st.setString(3, "order.paid");
        st.setString(4, "{\"n\":" + n + ",\"total\":10}");
        try (ResultSet rs = st.executeQuery()) {
            rs.next();
        }
    }

    private static double pct(long[] sorted, double p) {
        if (sorted.length == 0) {
            return 0;
        }
        int index = (int) Math.ceil(p / 100.0 * sorted.length) - 1;
        return sorted[Math.max(0, Math.min(sorted.length - 1, index))] / 1000.0;
    }

    /** Peak resident memory and CPU time of this JVM (engine, connector, producer, harness). */
    private static void printResources() throws Exception {
        String hwm = Files.readAllLines(Path.of("/proc/self/status")).stream()
            .filter(line -> line.startsWith("VmHWM:")).findFirst().orElse("VmHWM: ? kB")
            .replaceAll("\\s+", " ");
        double cpu = ((com.sun.management.OperatingSystemMXBean) ManagementFactory.getOperatingSystemMXBean())
            .getProcessCpuTime() / 1e9;
        System.out.printf("debezium jvm: peak RSS %s, CPU %.1f s, heap max %d MB%n", hwm.substring(7).trim(),
            cpu, Runtime.getRuntime().maxMemory() >> 20);
    }
}
