//! ICE server URLs and WHIP/WHEP `Link` header values for this TURN server.

use std::net::Ipv6Addr;

/// TURN URLs (RFC 7065) for `host`: `turn:` over UDP and TCP, `turns:` over TLS.
/// `None` ports are left out. IPv6 literals are bracketed.
pub fn ice_urls(
    host: &str,
    udp_port: Option<u16>,
    tcp_port: Option<u16>,
    tls_port: Option<u16>,
) -> Vec<String> {
    let h = if host.parse::<Ipv6Addr>().is_ok() {
        format!("[{host}]")
    } else {
        host.to_string()
    };
    let mut v = Vec::new();
    if let Some(p) = udp_port {
        v.push(format!("turn:{h}:{p}?transport=udp"));
    }
    if let Some(p) = tcp_port {
        v.push(format!("turn:{h}:{p}?transport=tcp"));
    }
    if let Some(p) = tls_port {
        v.push(format!("turns:{h}:{p}?transport=tcp"));
    }
    v
}

fn quote(s: &str) -> String {
    s.replace('\\', "\\\\").replace('"', "\\\"")
}

/// `Link` header values for WHIP/WHEP responses (RFC 9725 §4.6), one per URL:
/// `<turn:...>; rel="ice-server"; username="..."; credential="..."; credential-type="password"`.
pub fn link_header_values(urls: &[String], username: &str, credential: &str) -> Vec<String> {
    urls.iter()
        .map(|u| {
            format!(
                "<{u}>; rel=\"ice-server\"; username=\"{}\"; credential=\"{}\"; credential-type=\"password\"",
                quote(username),
                quote(credential)
            )
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_and_links() {
        let u = ice_urls("edge.example.net", Some(3478), Some(3478), Some(5349));
        assert_eq!(
            u,
            vec![
                "turn:edge.example.net:3478?transport=udp",
                "turn:edge.example.net:3478?transport=tcp",
                "turns:edge.example.net:5349?transport=tcp"
            ]
        );
        assert_eq!(
            ice_urls("2001:db8::1", Some(1), None, None),
            vec!["turn:[2001:db8::1]:1?transport=udp"]
        );
        let l = link_header_values(&u[..1], "1700000000:bob", "a\"b");
        assert_eq!(
            l[0],
            "<turn:edge.example.net:3478?transport=udp>; rel=\"ice-server\"; username=\"1700000000:bob\"; credential=\"a\\\"b\"; credential-type=\"password\""
        );
    }
}
