//! Namespace-wide TCP counters from /proc/net/netstat (the `TcpExt:` lines `nstat` reads).

#![forbid(unsafe_code)]

/// The listen-queue counters: `(ListenOverflows, ListenDrops)`.
pub fn listen_counters() -> std::io::Result<(u64, u64)> {
    let text = std::fs::read_to_string("/proc/net/netstat")?;
    Ok((field(&text, "TcpExt", "ListenOverflows").unwrap_or(0), field(&text, "TcpExt", "ListenDrops").unwrap_or(0)))
}

/// Finds `name` in the header line of `group` and returns the value under it in the next line.
pub fn field(text: &str, group: &str, name: &str) -> Option<u64> {
    let prefix = format!("{group}:");
    let mut lines = text.lines().filter(|l| l.starts_with(&prefix));
    while let (Some(head), Some(vals)) = (lines.next(), lines.next()) {
        let pos = head.split_whitespace().skip(1).position(|n| n == name);
        if let Some(pos) = pos {
            return vals.split_whitespace().nth(pos + 1)?.parse().ok();
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_a_named_column() {
        let text = "TcpExt: SyncookiesSent ListenOverflows ListenDrops\nTcpExt: 1 7 9\n\
                    IpExt: InNoRoutes\nIpExt: 3\n";
        assert_eq!(field(text, "TcpExt", "ListenOverflows"), Some(7));
        assert_eq!(field(text, "TcpExt", "ListenDrops"), Some(9));
        assert_eq!(field(text, "IpExt", "InNoRoutes"), Some(3));
        assert_eq!(field(text, "TcpExt", "Nope"), None);
        assert_eq!(field("TcpExt: A\n", "TcpExt", "A"), None);
    }

    #[test]
    fn this_kernel_has_the_counters() {
        let text = std::fs::read_to_string("/proc/net/netstat").unwrap();
        assert!(field(&text, "TcpExt", "ListenOverflows").is_some());
        assert!(field(&text, "TcpExt", "ListenDrops").is_some());
    }
}
