//! WHIP/WHEP HTTP signalling (RFC 9725 conventions) and local address selection,
//! shared by the publisher and the WHEP client.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, ToSocketAddrs, UdpSocket};

/// Upper bound for an SDP answer body we accept.
const MAX_ANSWER_BYTES: usize = 64 * 1024;

/// Name of the response header carrying the viewer's role.
pub const ROLE_HEADER: &str = "x-edgerelay-role";

/// The result of one offer/answer POST.
#[derive(Debug, Clone)]
pub struct SdpExchange {
    /// The SDP answer.
    pub answer: String,
    /// Absolute URL of the created resource (from `Location`), used for DELETE.
    pub resource: Option<String>,
    /// Value of `X-Edgerelay-Role`, if present.
    pub role: Option<String>,
}

/// POSTs `offer` (application/sdp) to `url` with an optional bearer token and returns
/// the answer. Fails unless the server answers 200/201 with a body.
pub async fn post_offer(
    client: &reqwest::Client,
    url: &str,
    token: Option<&str>,
    offer: &str,
) -> anyhow::Result<SdpExchange> {
    let base = reqwest::Url::parse(url).map_err(|e| anyhow::anyhow!("bad URL {url}: {e}"))?;
    let mut req = client
        .post(base.clone())
        .header(reqwest::header::CONTENT_TYPE, "application/sdp")
        .body(offer.to_owned());
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    let resp = req.send().await?;
    let status = resp.status();
    let headers = resp.headers().clone();
    let body = resp.bytes().await?;
    if !(status == reqwest::StatusCode::CREATED || status == reqwest::StatusCode::OK) {
        let text = String::from_utf8_lossy(&body[..body.len().min(300)]).into_owned();
        anyhow::bail!("POST {url}: HTTP {status}: {text}");
    }
    anyhow::ensure!(
        body.len() <= MAX_ANSWER_BYTES,
        "POST {url}: answer too large ({} bytes)",
        body.len()
    );
    let answer = String::from_utf8(body.to_vec())
        .map_err(|_| anyhow::anyhow!("POST {url}: answer is not UTF-8"))?;
    anyhow::ensure!(
        answer.starts_with("v=0"),
        "POST {url}: body is not an SDP answer"
    );
    let resource = headers
        .get(reqwest::header::LOCATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|loc| base.join(loc).ok())
        .map(|u| u.to_string());
    let role = headers
        .get(ROLE_HEADER)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    Ok(SdpExchange {
        answer,
        resource,
        role,
    })
}

/// DELETEs a WHIP/WHEP resource. 200, 204 and 404 count as success.
pub async fn delete_resource(
    client: &reqwest::Client,
    resource: &str,
    token: Option<&str>,
) -> anyhow::Result<()> {
    let mut req = client.delete(resource);
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    let status = req.send().await?.status();
    anyhow::ensure!(
        status.is_success() || status == reqwest::StatusCode::NOT_FOUND,
        "DELETE {resource}: HTTP {status}"
    );
    Ok(())
}

/// The local IP address to put in our host candidate when talking to `url`'s host:
/// loopback for loopback targets, otherwise the address the kernel routes from.
pub fn local_ip_for(url: &str) -> anyhow::Result<IpAddr> {
    let u = reqwest::Url::parse(url).map_err(|e| anyhow::anyhow!("bad URL {url}: {e}"))?;
    let host = u
        .host_str()
        .ok_or_else(|| anyhow::anyhow!("URL {url} has no host"))?;
    let port = u.port_or_known_default().unwrap_or(443);
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let target: SocketAddr = (host, port)
        .to_socket_addrs()?
        .next()
        .ok_or_else(|| anyhow::anyhow!("cannot resolve {host}"))?;
    if target.ip().is_loopback() {
        return Ok(if target.is_ipv4() {
            IpAddr::V4(Ipv4Addr::LOCALHOST)
        } else {
            IpAddr::V6(Ipv6Addr::LOCALHOST)
        });
    }
    // connect() on UDP only selects a route; nothing is sent.
    let probe = if target.is_ipv4() {
        UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0))?
    } else {
        UdpSocket::bind((Ipv6Addr::UNSPECIFIED, 0))?
    };
    probe.connect(target)?;
    Ok(probe.local_addr()?.ip())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_targets_use_loopback() {
        assert_eq!(
            local_ip_for("http://127.0.0.1:8080/whip/x").expect("ip"),
            IpAddr::V4(Ipv4Addr::LOCALHOST)
        );
        assert_eq!(
            local_ip_for("http://[::1]:8080/whep/x").expect("ip"),
            IpAddr::V6(Ipv6Addr::LOCALHOST)
        );
        assert!(local_ip_for("not a url").is_err());
    }
}
