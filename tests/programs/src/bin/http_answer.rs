//! Not a storehost plugin: a `wasi:http/proxy` component that answers every request with the
//! JSON a storehost `query` of the bench plugin answers (`{"found":0}`). The benchmark command
//! serves it with `wasmtime serve` as the peer of storehost's query route; the tests check that
//! storehost refuses it as a plugin and says why.
#![forbid(unsafe_code)]

use wasi::http::types::{
    Fields, IncomingRequest, OutgoingBody, OutgoingResponse, ResponseOutparam,
};

struct Answer;

const BODY: &[u8] = br#"{"found":0}"#;

impl wasi::exports::http::incoming_handler::Guest for Answer {
    fn handle(_request: IncomingRequest, response_out: ResponseOutparam) {
        let headers = Fields::new();
        // A header that cannot be set leaves the answer without it; the body still goes out.
        let _ = headers.append("content-type", b"application/json");
        let response = OutgoingResponse::new(headers);
        let Ok(body) = response.body() else {
            return;
        };
        ResponseOutparam::set(response_out, Ok(response));
        if let Ok(out) = body.write() {
            let _ = out.blocking_write_and_flush(BODY);
        }
        let _ = OutgoingBody::finish(body, None);
    }
}

wasi::http::proxy::export!(Answer);

fn main() {}
