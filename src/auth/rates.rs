//! Token buckets (governor's GCRA) per key and per tenant, for requests/s
//! and events/s. The request buckets of a key are checked before the body is
//! read; the event buckets, and the tenant buckets, once the body is parsed
//! and the events counted. Either way a refused request never reaches the
//! WAL.
//!
//! A request is checked against several buckets one after another; governor
//! has no atomic multi-bucket check, so a request refused by a later bucket
//! has already spent its tokens in the earlier ones. The over-charge is at
//! most one request's worth per refusal, and it errs on the side of the
//! limit.

use std::collections::HashMap;
use std::num::NonZeroU32;
use std::time::Duration;

use governor::clock::{Clock, DefaultClock};
use governor::{DefaultDirectRateLimiter, DefaultKeyedRateLimiter, Quota, RateLimiter};

use super::config::{RatesConfig, TenantRates};

/// A bucket's rate and burst, as configured; 0 per second means unlimited,
/// a burst of 0 means one second's worth.
fn quota(per_sec: u32, burst: u32) -> Option<Quota> {
    let rate = NonZeroU32::new(per_sec)?;
    let burst = NonZeroU32::new(burst).unwrap_or(rate);
    Some(Quota::per_second(rate).allow_burst(burst))
}

/// The outcome of a rate check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RateDecision {
    Allow,
    /// Over the limit: come back after `retry_after`.
    Limited {
        scope: &'static str,
        unit: &'static str,
        who: String,
        retry_after: Duration,
    },
    /// More events in one request than the bucket can ever hold: retrying
    /// will not help, splitting the batch will.
    Oversized {
        scope: &'static str,
        unit: &'static str,
        who: String,
        events: u32,
        burst: u32,
    },
}

/// One kind of bucket (say, events per tenant): a default quota for every
/// name, and per-name overrides.
struct Buckets {
    scope: &'static str,
    unit: &'static str,
    default: Option<(DefaultKeyedRateLimiter<String>, u32)>,
    overrides: HashMap<String, Option<(DefaultDirectRateLimiter, u32)>>,
}

impl Buckets {
    fn new(
        scope: &'static str,
        unit: &'static str,
        default: (u32, u32),
        overrides: HashMap<String, (u32, u32)>,
    ) -> Buckets {
        let burst = |(rate, burst): (u32, u32)| if burst == 0 { rate } else { burst };
        Buckets {
            scope,
            unit,
            default: quota(default.0, default.1).map(|q| (RateLimiter::keyed(q), burst(default))),
            overrides: overrides
                .into_iter()
                .map(|(name, rb)| {
                    let limiter = quota(rb.0, rb.1).map(|q| (RateLimiter::direct(q), burst(rb)));
                    (name, limiter)
                })
                .collect(),
        }
    }

    fn check(&self, who: &str, n: u32) -> RateDecision {
        let Some(n) = NonZeroU32::new(n) else {
            return RateDecision::Allow;
        };
        let (outcome, burst) = match self.overrides.get(who) {
            Some(None) => return RateDecision::Allow,
            Some(Some((limiter, burst))) => (limiter.check_n(n), *burst),
            None => match &self.default {
                None => return RateDecision::Allow,
                Some((limiter, burst)) => (limiter.check_key_n(&who.to_string(), n), *burst),
            },
        };
        match outcome {
            Ok(Ok(())) => RateDecision::Allow,
            Ok(Err(not_until)) => RateDecision::Limited {
                scope: self.scope,
                unit: self.unit,
                who: who.to_string(),
                retry_after: not_until.wait_time_from(DefaultClock::default().now()),
            },
            Err(_) => RateDecision::Oversized {
                scope: self.scope,
                unit: self.unit,
                who: who.to_string(),
                events: n.get(),
                burst,
            },
        }
    }

    fn housekeeping(&self) {
        if let Some((limiter, _)) = &self.default {
            limiter.retain_recent();
            limiter.shrink_to_fit();
        }
    }
}

/// A stream's own buckets (`[[streams]]` rate settings): requests and
/// events on the stream, across keys and tenants.
pub struct StreamRates {
    requests: Buckets,
    events: Buckets,
}

impl std::fmt::Debug for StreamRates {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("StreamRates")
    }
}

impl StreamRates {
    /// `(per second, burst)` for requests and for events; a rate of 0 is no
    /// limit, a burst of 0 is the rate.
    pub fn new(requests: (u32, u32), events: (u32, u32)) -> StreamRates {
        StreamRates {
            requests: Buckets::new("stream", "requests", requests, HashMap::new()),
            events: Buckets::new("stream", "events", events, HashMap::new()),
        }
    }

    /// Before the body is read: one request on `stream`.
    pub fn check_request(&self, stream: &str) -> RateDecision {
        self.requests.check(stream, 1)
    }

    /// After parsing: `n` accepted events on `stream`.
    pub fn check_events(&self, stream: &str, n: u32) -> RateDecision {
        self.events.check(stream, n)
    }
}

pub struct Rates {
    key_requests: Buckets,
    key_events: Buckets,
    tenant_requests: Buckets,
    tenant_events: Buckets,
}

impl Rates {
    pub fn new(cfg: &RatesConfig) -> Rates {
        let over = |pick: fn(&TenantRates) -> (Option<u32>, Option<u32>), default: (u32, u32)| {
            cfg.tenant
                .iter()
                .filter_map(|(name, t)| match pick(t) {
                    (None, None) => None,
                    (rate, burst) => Some((
                        name.clone(),
                        (rate.unwrap_or(default.0), burst.unwrap_or(default.1)),
                    )),
                })
                .collect()
        };
        let tr = (cfg.tenant_requests_per_sec, cfg.tenant_requests_burst);
        let te = (cfg.tenant_events_per_sec, cfg.tenant_events_burst);
        Rates {
            key_requests: Buckets::new(
                "key",
                "requests",
                (cfg.key_requests_per_sec, cfg.key_requests_burst),
                HashMap::new(),
            ),
            key_events: Buckets::new(
                "key",
                "events",
                (cfg.key_events_per_sec, cfg.key_events_burst),
                HashMap::new(),
            ),
            tenant_requests: Buckets::new(
                "tenant",
                "requests",
                tr,
                over(|t| (t.requests_per_sec, t.requests_burst), tr),
            ),
            tenant_events: Buckets::new(
                "tenant",
                "events",
                te,
                over(|t| (t.events_per_sec, t.events_burst), te),
            ),
        }
    }

    /// Before the body is read: one request for this key.
    pub fn check_key_request(&self, key: &str) -> RateDecision {
        self.key_requests.check(key, 1)
    }

    /// After parsing: the accepted events, for the key and per tenant
    /// (`tenants` holds each distinct tenant with its event count).
    pub fn check_batch(&self, key: Option<&str>, tenants: &[(String, u32)]) -> RateDecision {
        for (tenant, _) in tenants {
            let d = self.tenant_requests.check(tenant, 1);
            if d != RateDecision::Allow {
                return d;
            }
        }
        for (tenant, n) in tenants {
            let d = self.tenant_events.check(tenant, *n);
            if d != RateDecision::Allow {
                return d;
            }
        }
        if let Some(key) = key {
            let total = tenants.iter().map(|(_, n)| *n).sum();
            return self.key_events.check(key, total);
        }
        RateDecision::Allow
    }

    /// Forgets buckets that are full again, so a stream of distinct names
    /// does not grow memory for ever.
    pub fn housekeeping(&self) {
        for b in [
            &self.key_requests,
            &self.key_events,
            &self.tenant_requests,
            &self.tenant_events,
        ] {
            b.housekeeping();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> RatesConfig {
        RatesConfig {
            tenant_events_per_sec: 10,
            tenant_events_burst: 20,
            ..RatesConfig::default()
        }
    }

    #[test]
    fn a_bucket_admits_its_burst_then_says_when_to_come_back() {
        let rates = Rates::new(&cfg());
        let batch = |n| vec![("acme".to_string(), n)];
        assert_eq!(rates.check_batch(None, &batch(20)), RateDecision::Allow);
        match rates.check_batch(None, &batch(5)) {
            RateDecision::Limited {
                scope,
                unit,
                who,
                retry_after,
            } => {
                assert_eq!((scope, unit, who.as_str()), ("tenant", "events", "acme"));
                // 5 events at 10/s: the bucket holds 5 again after ~0.5 s.
                assert!(
                    retry_after > Duration::from_millis(400)
                        && retry_after <= Duration::from_millis(500),
                    "{retry_after:?}"
                );
            }
            other => panic!("{other:?}"),
        }
        // Another tenant has its own bucket.
        assert_eq!(
            rates.check_batch(None, &[("globex".to_string(), 20)]),
            RateDecision::Allow
        );
        // More than the burst can never pass.
        assert_eq!(
            rates.check_batch(None, &[("initech".to_string(), 21)]),
            RateDecision::Oversized {
                scope: "tenant",
                unit: "events",
                who: "initech".into(),
                events: 21,
                burst: 20
            }
        );
    }

    #[test]
    fn per_tenant_overrides_replace_the_default() {
        let mut c = cfg();
        c.tenant.insert(
            "big".into(),
            TenantRates {
                events_per_sec: Some(0),
                ..Default::default()
            },
        );
        c.tenant.insert(
            "small".into(),
            TenantRates {
                events_burst: Some(2),
                ..Default::default()
            },
        );
        let rates = Rates::new(&c);
        for _ in 0..100 {
            assert_eq!(
                rates.check_batch(None, &[("big".to_string(), 1000)]),
                RateDecision::Allow,
                "0/s means unlimited"
            );
        }
        assert_eq!(
            rates.check_batch(None, &[("small".to_string(), 2)]),
            RateDecision::Allow
        );
        assert!(matches!(
            rates.check_batch(None, &[("small".to_string(), 1)]),
            RateDecision::Limited { .. }
        ));
    }

    #[test]
    fn key_request_bucket_counts_requests() {
        let rates = Rates::new(&RatesConfig {
            key_requests_per_sec: 1,
            key_requests_burst: 3,
            ..RatesConfig::default()
        });
        for _ in 0..3 {
            assert_eq!(rates.check_key_request("k"), RateDecision::Allow);
        }
        match rates.check_key_request("k") {
            RateDecision::Limited { retry_after, .. } => {
                assert!(retry_after > Duration::from_millis(900), "{retry_after:?}")
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(rates.check_key_request("other"), RateDecision::Allow);
        rates.housekeeping();
    }
}
