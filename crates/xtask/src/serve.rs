//! A small static file server for `dist/`: loopback only, correct MIME types
//! (browsers compile wasm while streaming only for `application/wasm`), and
//! `Content-Length` so the page can show download progress.
//! `cargo xtask serve` sends the cross-origin isolation headers itself, so the
//! page is threaded from the first visit; the browser suite also serves the site
//! without them, as most static hosts do, to test the service worker's way there.

use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Component, Path, PathBuf};

fn mime(path: &Path) -> &'static str {
    match path.extension().and_then(|e| e.to_str()).unwrap_or("") {
        "html" => "text/html; charset=utf-8",
        "js" => "text/javascript; charset=utf-8",
        "css" => "text/css; charset=utf-8",
        "json" => "application/json",
        "wasm" => "application/wasm",
        "svg" => "image/svg+xml",
        "png" => "image/png",
        _ => "application/octet-stream",
    }
}

/// Maps a request path to a file under `root`, refusing anything that climbs out.
fn resolve(root: &Path, request_path: &str) -> Option<PathBuf> {
    let path = request_path.split(['?', '#']).next().unwrap_or("/");
    let mut resolved = root.to_path_buf();
    for component in Path::new(path.trim_start_matches('/')).components() {
        match component {
            Component::Normal(part) => resolved.push(part),
            Component::CurDir => {}
            _ => return None,
        }
    }
    if resolved.is_dir() {
        resolved.push("index.html");
    }
    resolved.is_file().then_some(resolved)
}

/// What the server adds to every answer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Headers {
    /// COOP/COEP/CORP: the page is cross-origin isolated without the service worker.
    Isolation,
    /// Nothing a plain static host would not send.
    Plain,
}

impl Headers {
    fn lines(self) -> &'static str {
        match self {
            Headers::Isolation => {
                "Cross-Origin-Opener-Policy: same-origin\r\nCross-Origin-Embedder-Policy: require-corp\r\nCross-Origin-Resource-Policy: same-origin\r\n"
            }
            Headers::Plain => "",
        }
    }
}

fn respond(mut stream: TcpStream, root: &Path, headers: Headers) -> std::io::Result<()> {
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut request_line = String::new();
    reader.read_line(&mut request_line)?;
    // Drain the headers; nothing in them changes the answer.
    let mut header = String::new();
    while reader.read_line(&mut header)? > 2 {
        header.clear();
    }
    let mut parts = request_line.split_whitespace();
    let (method, target) = (parts.next().unwrap_or(""), parts.next().unwrap_or("/"));
    let found = if method == "GET" || method == "HEAD" {
        resolve(root, target)
    } else {
        None
    };
    match found.and_then(|path| std::fs::read(&path).ok().map(|body| (path, body))) {
        Some((path, body)) => {
            write!(
                stream,
                "HTTP/1.1 200 OK\r\nContent-Type: {}\r\nContent-Length: {}\r\nCache-Control: no-cache\r\n{}Connection: close\r\n\r\n",
                mime(&path),
                body.len(),
                headers.lines()
            )?;
            if method == "GET" {
                stream.write_all(&body)?;
            }
        }
        None => {
            let body = b"not found\n";
            write!(
                stream,
                "HTTP/1.1 404 Not Found\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                body.len()
            )?;
            stream.write_all(body)?;
        }
    }
    stream.flush()
}

/// Serves `root` on `listener` until the process ends.
pub fn serve(listener: TcpListener, root: PathBuf, headers: Headers) {
    for stream in listener.incoming().flatten() {
        let root = root.clone();
        std::thread::spawn(move || {
            let _ = respond(stream, &root, headers);
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    fn answer(headers: Headers) -> String {
        let root = std::env::temp_dir().join(format!("xtask-serve-{}-{headers:?}", std::process::id()));
        std::fs::create_dir_all(&root).unwrap();
        std::fs::write(root.join("index.html"), "<!doctype html>").unwrap();
        let listener = TcpListener::bind(("127.0.0.1", 0)).unwrap();
        let address = listener.local_addr().unwrap();
        std::thread::spawn(move || serve(listener, root, headers));
        let mut stream = TcpStream::connect(address).unwrap();
        stream.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
        let mut response = String::new();
        stream.read_to_string(&mut response).unwrap();
        response
    }

    #[test]
    fn the_isolating_server_sends_coop_and_coep_and_the_plain_one_does_not() {
        let isolated = answer(Headers::Isolation);
        assert!(isolated.starts_with("HTTP/1.1 200 OK"), "{isolated}");
        assert!(
            isolated.contains("Cross-Origin-Opener-Policy: same-origin\r\n"),
            "{isolated}"
        );
        assert!(
            isolated.contains("Cross-Origin-Embedder-Policy: require-corp\r\n"),
            "{isolated}"
        );
        let plain = answer(Headers::Plain);
        assert!(plain.starts_with("HTTP/1.1 200 OK"), "{plain}");
        assert!(!plain.contains("Cross-Origin"), "{plain}");
        assert!(plain.ends_with("<!doctype html>"), "{plain}");
    }
}
