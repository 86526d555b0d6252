//! Webhook idempotency: which `svix-id`s were applied and delivered, and who is acting on one
//! right now.
//!
//! Svix retries deliveries, and retries overlap: of concurrent deliveries of one id exactly one
//! claims it and acts, the others wait for its outcome. [`LocalLedger`] does this for one
//! process; `fleet::FleetStore` adds a fleet-wide claim (Redis) so that one replica acts on a
//! delivery that reached several. The handler sees only [`WebhookLedger`].

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Mutex;
use std::time::Duration;

use tokio::sync::watch;

/// What happened to a webhook id.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct WebhookProgress {
    /// The local state change was applied.
    pub applied: bool,
    /// The event reached the upstream (or forwarding is off).
    pub delivered: bool,
}

/// The answer to "may I act on this webhook id?".
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WebhookClaim {
    /// This caller holds the claim until it calls [`WebhookLedger::release`]; the progress is
    /// what earlier deliveries of the id completed.
    Won(WebhookProgress),
    /// Another delivery of the id held the claim for longer than the caller waits (409: Svix
    /// retries).
    Busy,
    /// The replicas cannot agree on who acts right now (`fleet.on_unavailable =
    /// "fail_closed"`; 503: Svix retries).
    Unavailable,
}

/// A boxed future, so that the ledger can be a trait object.
pub type ClaimFuture<'a> = Pin<Box<dyn Future<Output = WebhookClaim> + Send + 'a>>;

/// The `svix-id` table behind the webhook handler.
pub trait WebhookLedger: Send + Sync {
    /// Claims `id` atomically, waiting up to `wait` for another delivery's claim to be
    /// released. A [`WebhookClaim::Won`] must be followed by exactly one [`Self::release`].
    fn claim<'a>(&'a self, id: &'a str, wait: Duration) -> ClaimFuture<'a>;
    /// Records the winner's progress and releases its claim, waking the waiters. Never blocks
    /// (a shared ledger finishes in the background).
    fn release(&self, id: &str, progress: WebhookProgress);
}

/// The per-process ledger: bounded progress table and the claims held now.
pub struct LocalLedger {
    progress: moka::sync::Cache<String, WebhookProgress>,
    /// Webhook ids being processed now; dropping the sender wakes every waiter.
    claims: Mutex<HashMap<String, watch::Sender<()>>>,
}

/// What a claim attempt found, without waiting.
enum TryClaim {
    Won(WebhookProgress),
    /// `changed()` returns (with an error) once that claim is released.
    Busy(watch::Receiver<()>),
}

impl LocalLedger {
    /// `retention` must cover the Svix tolerance window (and retries within it).
    pub fn new(retention: Duration, max_entries: u64) -> Self {
        Self {
            progress: crate::revocations::bounded(max_entries, retention),
            claims: Mutex::new(HashMap::new()),
        }
    }

    fn try_claim(&self, id: &str) -> TryClaim {
        // Nothing panics under this lock; a poisoned map is still the set of claims.
        let mut claims = self.claims.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(held) = claims.get(id) {
            return TryClaim::Busy(held.subscribe());
        }
        claims.insert(id.to_owned(), watch::Sender::new(()));
        drop(claims);
        TryClaim::Won(self.progress.get(id).unwrap_or_default())
    }

    /// Claims `id` in this process, waiting up to `wait` for a claim held by another delivery.
    pub async fn claim_local(&self, id: &str, wait: Duration) -> WebhookClaim {
        loop {
            match self.try_claim(id) {
                TryClaim::Won(progress) => return WebhookClaim::Won(progress),
                TryClaim::Busy(mut released) => {
                    if tokio::time::timeout(wait, released.changed())
                        .await
                        .is_err()
                    {
                        return WebhookClaim::Busy;
                    }
                }
            }
        }
    }
}

impl WebhookLedger for LocalLedger {
    fn claim<'a>(&'a self, id: &'a str, wait: Duration) -> ClaimFuture<'a> {
        Box::pin(self.claim_local(id, wait))
    }

    fn release(&self, id: &str, progress: WebhookProgress) {
        // Progress first, so a waiter woken by the release reads the outcome.
        self.progress.insert(id.to_owned(), progress);
        self.claims
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ledger() -> LocalLedger {
        LocalLedger::new(Duration::from_secs(600), 100)
    }

    const DONE: WebhookProgress = WebhookProgress {
        applied: true,
        delivered: true,
    };

    async fn won(l: &LocalLedger, id: &str) -> WebhookProgress {
        match l.claim(id, Duration::ZERO).await {
            WebhookClaim::Won(p) => p,
            other => panic!("{id}: expected to win, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn webhook_progress_is_remembered() {
        let l = ledger();
        assert_eq!(won(&l, "msg_1").await, WebhookProgress::default());
        let p = WebhookProgress {
            applied: true,
            delivered: false,
        };
        l.release("msg_1", p);
        assert_eq!(won(&l, "msg_1").await, p);
    }

    #[tokio::test]
    async fn a_full_ledger_keeps_the_newest_ids() {
        let l = LocalLedger::new(Duration::from_secs(600), 20);
        for i in 0..60 {
            let id = format!("msg_{i}");
            won(&l, &id).await;
            l.release(&id, DONE);
            // Eviction runs in moka's maintenance; run it as a busy process would.
            l.progress.run_pending_tasks();
            assert_eq!(won(&l, &id).await, DONE, "webhook id {i} forgotten");
            l.release(&id, DONE);
        }
    }

    #[tokio::test]
    async fn one_claim_per_webhook_id_and_waiters_see_the_outcome() {
        let l = std::sync::Arc::new(ledger());
        assert_eq!(won(&l, "msg_1").await, WebhookProgress::default());
        assert_eq!(
            l.claim("msg_1", Duration::ZERO).await,
            WebhookClaim::Busy,
            "a second claim while the first is held must wait"
        );
        assert_eq!(
            won(&l, "msg_2").await,
            WebhookProgress::default(),
            "other ids are independent"
        );
        let waiter = tokio::spawn({
            let l = l.clone();
            async move { l.claim("msg_1", Duration::from_secs(5)).await }
        });
        // The waiter is parked on the held claim until the release.
        tokio::task::yield_now().await;
        l.release("msg_1", DONE);
        let after = tokio::time::timeout(Duration::from_secs(5), waiter)
            .await
            .expect("the release wakes the waiter")
            .expect("the waiter does not panic");
        assert_eq!(
            after,
            WebhookClaim::Won(DONE),
            "and reads the winner's outcome"
        );
    }
}
