// Copyright the tvm authors.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! The metrics lines `FlushMetrics` writes, in Firecracker's shape: one JSON object per
//! line, `utc_timestamp_ms` first, then one object per section (`vcpu`, `block`,
//! `block_<drive id>`, `net`, `net_<iface id>`, `entropy`, `api_server`, ...) of counters.
//!
//! Like Firecracker's counters, each value is what the counter grew by since the previous
//! line (the first line: since the VMM started). The VMM hands [`MetricsLog::line`] the
//! absolute values it read; this module keeps the previous ones and does the arithmetic,
//! so a counter that the VMM reads lower than before (a device replaced) writes 0, never
//! a wrapped number.

use std::collections::BTreeMap;

/// Counters by section and name, absolute (since the VMM started).
pub type MetricSections = BTreeMap<String, BTreeMap<String, u64>>;

/// Adds a section `total` whose every counter is the sum of that counter over the sections
/// whose names start with `prefix` (Firecracker's `block` over every `block_<id>`). With
/// no such section, `total` is not added.
pub fn add_total(sections: &mut MetricSections, prefix: &str, total: &str) {
    let mut sum: BTreeMap<String, u64> = BTreeMap::new();
    let mut any = false;
    for (name, counters) in sections.iter() {
        if !name.starts_with(prefix) {
            continue;
        }
        any = true;
        for (k, v) in counters {
            let s = sum.entry(k.clone()).or_default();
            *s = s.saturating_add(*v);
        }
    }
    if any {
        sections.insert(total.to_string(), sum);
    }
}

/// The writer's memory: the counters of the previous line.
#[derive(Debug, Default)]
pub struct MetricsLog {
    last: MetricSections,
}

impl MetricsLog {
    /// A log whose first line counts from zero.
    pub fn new() -> Self {
        Self::default()
    }

    /// One line (ending in `\n`): `utc_timestamp_ms` is `now_ms`, and each counter of
    /// `current` is written as what it grew by since the previous line.
    pub fn line(&mut self, now_ms: u64, current: MetricSections) -> String {
        let mut out = serde_json::Map::new();
        out.insert("utc_timestamp_ms".into(), now_ms.into());
        for (section, counters) in &current {
            let before = self.last.get(section);
            let diff: serde_json::Map<String, serde_json::Value> = counters
                .iter()
                .map(|(k, v)| {
                    let was = before.and_then(|b| b.get(k)).copied().unwrap_or(0);
                    (k.clone(), v.saturating_sub(was).into())
                })
                .collect();
            out.insert(section.clone(), diff.into());
        }
        self.last = current;
        let mut line = serde_json::Value::Object(out).to_string();
        line.push('\n');
        line
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sections(list: &[(&str, &[(&str, u64)])]) -> MetricSections {
        list.iter()
            .map(|(s, c)| {
                let counters = c.iter().map(|(k, v)| (k.to_string(), *v)).collect();
                (s.to_string(), counters)
            })
            .collect()
    }

    #[test]
    fn each_line_has_the_growth_since_the_last() {
        let mut log = MetricsLog::new();
        let first = log.line(
            1000,
            sections(&[("vcpu", &[("exit_io_in", 5)]), ("api_server", &[])]),
        );
        assert!(first.ends_with('\n') && !first[..first.len() - 1].contains('\n'));
        let v: serde_json::Value = serde_json::from_str(&first).unwrap();
        assert_eq!(v["utc_timestamp_ms"], 1000);
        assert_eq!(v["vcpu"]["exit_io_in"], 5);
        assert!(v["api_server"].as_object().unwrap().is_empty());
        let second = log.line(2000, sections(&[("vcpu", &[("exit_io_in", 12)])]));
        let v: serde_json::Value = serde_json::from_str(&second).unwrap();
        assert_eq!(v["vcpu"]["exit_io_in"], 7);
        // A counter that went down (a device replaced) writes 0, not a wrapped number.
        let third = log.line(3000, sections(&[("vcpu", &[("exit_io_in", 2)])]));
        let v: serde_json::Value = serde_json::from_str(&third).unwrap();
        assert_eq!(v["vcpu"]["exit_io_in"], 0);
        // A counter that appears counts from zero.
        let fourth = log.line(
            4000,
            sections(&[("vcpu", &[("exit_io_in", 3), ("exit_io_out", 9)])]),
        );
        let v: serde_json::Value = serde_json::from_str(&fourth).unwrap();
        assert_eq!(
            (
                v["vcpu"]["exit_io_in"].as_u64(),
                v["vcpu"]["exit_io_out"].as_u64()
            ),
            (Some(1), Some(9))
        );
    }

    #[test]
    fn totals_sum_the_sections_with_the_prefix() {
        let mut s = sections(&[
            ("block_rootfs", &[("read_bytes", 10), ("write_count", 1)]),
            ("block_data", &[("read_bytes", 5)]),
            ("blocker", &[("read_bytes", 1000)]),
            ("net_eth0", &[("rx_bytes_count", 7)]),
        ]);
        add_total(&mut s, "block_", "block");
        add_total(&mut s, "net_", "net");
        add_total(&mut s, "vsock_", "vsock");
        assert_eq!(s["block"]["read_bytes"], 15);
        assert_eq!(s["block"]["write_count"], 1);
        assert_eq!(s["net"]["rx_bytes_count"], 7);
        assert!(!s.contains_key("vsock"));
    }
}
