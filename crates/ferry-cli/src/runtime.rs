//! The start of both binaries: their tokio runtime, with jemalloc's thread caches on its
//! threads only, and their rustls crypto provider.
//!
//! jemalloc is the allocator of the whole process, C libraries included (the
//! `unprefixed_malloc_on_supported_platforms` feature), with one arena and thread caches
//! off by default (`.cargo/config.toml`). A Kafka relay runs five librdkafka threads per
//! owned partition, which allocate little but would each keep a cache of freed blocks of
//! their own; the runtime's threads, where the relay's allocations happen, turn theirs
//! back on: a 16-partition Kafka relay peaks 5-7 MiB lower at the same CPU (BENCHMARKS.md
//! section 19). Small caches for every thread instead would cost the NATS relay's runtime
//! threads ~12% of their CPU (section 20); the SQLite store's worker threads, which sqlx
//! starts, pay ~6% for having none.

use std::future::Future;
use std::io;
use std::process::ExitCode;

/// Runs a binary's main future on [`build`]'s runtime, with ring as the process's rustls
/// provider (`ferry::tls::install_ring_provider`: without it the first TLS connection
/// panics).
pub fn run(main: impl Future<Output = ExitCode>) -> ExitCode {
    ferry::tls::install_ring_provider();
    match build() {
        Ok(runtime) => runtime.block_on(main),
        Err(err) => {
            eprintln!("error: cannot start the async runtime: {err}");
            ExitCode::FAILURE
        }
    }
}

/// A multi-threaded runtime whose threads, and the calling thread (which `block_on`
/// runs the main future on), keep a jemalloc thread cache.
pub fn build() -> io::Result<tokio::runtime::Runtime> {
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    builder.enable_all();
    #[cfg(not(target_env = "msvc"))]
    {
        enable_thread_cache()
            .map_err(|err| io::Error::other(format!("jemalloc's thread cache: {err}")))?;
        builder.on_thread_start(|| {
            enable_thread_cache().expect("jemalloc turned the calling thread's cache on");
        });
    }
    builder.build()
}

#[cfg(not(target_env = "msvc"))]
fn enable_thread_cache() -> tikv_jemalloc_ctl::Result<()> {
    use tikv_jemalloc_ctl::{Access, AsName};
    THREAD_CACHE.name().write(true)
}

/// jemalloc's setting of the calling thread's cache.
#[cfg(not(target_env = "msvc"))]
pub const THREAD_CACHE: &[u8] = b"thread.tcache.enabled\0";
