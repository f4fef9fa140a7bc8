//! The block cache's counters as Prometheus metrics, read from [`BlockCache::stats`] at each
//! scrape.

use std::sync::Arc;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;

use super::BlockCache;

/// Exports a cache's [`CacheStats`](super::CacheStats).
#[derive(Debug)]
pub struct CacheCollector(pub Arc<BlockCache>);

impl Collector for CacheCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let s = self.0.stats();
        let counters = [
            (
                "cache_memory_hits",
                "Blocks served from the memory cache",
                s.memory_hits,
            ),
            (
                "cache_memory_misses",
                "Blocks not in the memory cache",
                s.memory_misses,
            ),
            (
                "cache_disk_hits",
                "Blocks served from the disk cache (and verified)",
                s.disk_hits,
            ),
            (
                "cache_disk_misses",
                "Blocks in neither cache",
                s.disk_misses,
            ),
            (
                "cache_copy_hits",
                "Blocks read from a whole-file copy on disk (and verified)",
                s.copy_hits,
            ),
            (
                "cache_coalesced",
                "Gets served by a fetch of the same block already under way",
                s.coalesced,
            ),
            (
                "cache_fetches",
                "Blocks fetched from a remote and verified",
                s.fetches,
            ),
            (
                "cache_fetched_bytes",
                "Bytes of the blocks fetched from remotes",
                s.fetched_bytes,
            ),
            (
                "cache_fetch_errors",
                "Block fetches that failed",
                s.fetch_errors,
            ),
            (
                "verify_failures_remote",
                "Blocks from a remote that failed their checksum (EIO)",
                s.remote_verify_failures,
            ),
            (
                "verify_failures_disk",
                "Disk cache blocks that failed their checksum (fetched again)",
                s.disk_verify_failures,
            ),
            (
                "cache_disk_damaged",
                "Disk cache files dropped as damaged or foreign",
                s.disk_damaged,
            ),
            (
                "cache_memory_evictions",
                "Blocks evicted from the memory cache",
                s.memory_evictions,
            ),
            (
                "cache_disk_evictions",
                "Blocks evicted from the disk cache",
                s.disk_evictions,
            ),
            (
                "cache_disk_writes",
                "Blocks written to the disk cache",
                s.disk_writes,
            ),
            (
                "cache_disk_write_errors",
                "Disk cache writes that failed",
                s.disk_write_errors,
            ),
            (
                "cache_file_copies",
                "Whole-file copies written to the disk cache (for passthrough reads)",
                s.copies_written,
            ),
            (
                "cache_file_copies_damaged",
                "Whole-file copies found on disk that failed verification (removed)",
                s.copies_damaged,
            ),
        ];
        for (name, help, value) in counters {
            let c = ConstCounter::new(value);
            c.encode(encoder.encode_descriptor(name, help, None, c.metric_type())?)?;
        }
        let gauges = [
            (
                "cache_memory_bytes",
                "Bytes held by the memory cache",
                s.memory_bytes,
            ),
            (
                "cache_disk_bytes",
                "Bytes held by the disk cache (this process's estimate)",
                s.disk_bytes,
            ),
        ];
        for (name, help, value) in gauges {
            let g = ConstGauge::new(i64::try_from(value).unwrap_or(i64::MAX));
            g.encode(encoder.encode_descriptor(name, help, None, g.metric_type())?)?;
        }
        Ok(())
    }
}
