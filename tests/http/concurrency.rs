//! Many clients in parallel over real TCP: the WAL holds exactly the accepted
//! events, with contiguous sequence numbers matching every response.

use std::collections::BTreeMap;

use axum::http::StatusCode;

use super::{batch, harness, http_client, post_tcp, wal_records};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parallel_clients_get_disjoint_ranges_that_match_the_wal() {
    let h = harness();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = tokio::spawn(std::future::IntoFuture::into_future(axum::serve(
        listener,
        h.app(),
    )));
    let clients: Vec<_> = (0..32)
        .map(|c| {
            tokio::spawn(async move {
                let client = http_client();
                let mut acked = Vec::new();
                for r in 0..15 {
                    // Mix single events and batches up to 40, some invalid.
                    let n = if r % 3 == 0 { 1 } else { 1 + (c * 7 + r) % 40 };
                    let (body, good) = batch(&format!("c{c}-r{r}"), n, 5);
                    let (status, json) = post_tcp(&client, addr, body).await.unwrap();
                    if good.is_empty() {
                        assert_eq!(status, StatusCode::BAD_REQUEST);
                        continue;
                    }
                    assert_eq!(status, StatusCode::ACCEPTED, "{json}");
                    assert_eq!(json["accepted"], good.len());
                    let first = json["first_seq"].as_u64().unwrap();
                    let last = json["last_seq"].as_u64().unwrap();
                    assert_eq!(last - first + 1, good.len() as u64);
                    acked.push((first, good));
                }
                acked
            })
        })
        .collect();
    let mut expected = BTreeMap::new();
    for c in clients {
        for (first, ids) in c.await.unwrap() {
            for (i, id) in ids.into_iter().enumerate() {
                assert!(
                    expected.insert(first + i as u64, id).is_none(),
                    "seq given twice"
                );
            }
        }
    }
    server.abort();
    let wal: BTreeMap<u64, String> = wal_records(&h.state.wal)
        .into_iter()
        .map(|(seq, r)| {
            (
                seq,
                String::from_utf8(r.header("id").unwrap().to_vec()).unwrap(),
            )
        })
        .collect();
    assert_eq!(wal.len(), expected.len(), "exactly the accepted events");
    assert_eq!(
        wal.keys().copied().collect::<Vec<_>>(),
        (1..=expected.len() as u64).collect::<Vec<_>>(),
        "contiguous"
    );
    assert_eq!(wal, expected, "every response's range holds its own events");
}
