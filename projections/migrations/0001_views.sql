-- Shared by SQLite and PostgreSQL: only types and syntax both accept.

-- Where each projection is in each topic partition. Written in the same transaction as the
-- rows the projection derived from those offsets, so nothing is lost or applied twice.
CREATE TABLE IF NOT EXISTS projection_offsets (
    projection TEXT NOT NULL,
    generation BIGINT NOT NULL,
    topic TEXT NOT NULL,
    partition_id BIGINT NOT NULL,
    next_offset BIGINT NOT NULL,
    PRIMARY KEY (projection, generation, topic, partition_id)
);

-- Which generation of a projection's tables is served; a replay builds the next generation
-- beside it and swaps this pointer.
CREATE TABLE IF NOT EXISTS view_generations (
    projection TEXT PRIMARY KEY,
    active BIGINT NOT NULL,
    building BIGINT
);

-- The outcome of every write event, so a waiting client (or a later status poll) learns it.
CREATE TABLE IF NOT EXISTS write_outcomes (
    event_id TEXT PRIMARY KEY,
    status BIGINT NOT NULL,
    body TEXT NOT NULL,
    recorded_us BIGINT NOT NULL
);
