//! Deliveries whose payloads are decoded as the agent's contract.

use super::*;

/// A [`Subscription`] whose payloads are decoded as `T`, usually the
/// contract the agent accepts: from
/// [`Client::subscribe_typed`](crate::Client::subscribe_typed) or
/// [`Subscription::typed`]. A stream of `Result<TypedDelivery<T>>`.
///
/// A delivery whose payload does not decode as `T` (another type, or bytes
/// that are not a `T`) can never succeed, on any instance or attempt: it is
/// **rejected**, which fails its run and tells the run's owner, with a
/// reason naming `T` and the decode error, and it is surfaced as an error
/// of kind [`ErrorKind::Decode`]. The subscription goes on after such an
/// error; it ends (`None`) only when the stream to the broker does.
/// [`next_delivery`](TypedSubscription::next_delivery) waits for the
/// broker to confirm the reject; the [`Stream`] implementation sends it
/// without waiting.
pub struct TypedSubscription<T> {
    pub(super) inner: Subscription,
    pub(super) _payload: PhantomData<fn() -> T>,
}

impl<T> std::fmt::Debug for TypedSubscription<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TypedSubscription")
            .field("agent", &self.inner.shared.agent)
            .field("payload", &std::any::type_name::<T>())
            .finish()
    }
}

impl<T: prost::Message + prost::Name + Default> TypedSubscription<T> {
    /// The agent as the broker knows it (lease, attempts, fallback,
    /// accepted contract).
    pub fn agent(&self) -> &pb::AgentSpec {
        self.inner.agent()
    }

    /// The next delivery with its payload decoded; `None` once the
    /// subscription has ended. A payload that does not decode is rejected
    /// (this waits for the broker's answer) and returned as an error of
    /// kind [`ErrorKind::Decode`].
    pub async fn next_delivery(&mut self) -> Option<Result<TypedDelivery<T>>> {
        let delivery = match self.inner.next_delivery().await? {
            Ok(d) => d,
            Err(e) => return Some(Err(e)),
        };
        Some(match delivery.payload::<T>() {
            Ok(payload) => Ok(TypedDelivery { delivery, payload }),
            Err(e) => {
                let reason = undecodable::<T>(&e);
                let outcome = match delivery.reject(reason.clone()).await {
                    Ok(()) => "the delivery was rejected".to_string(),
                    Err(r) => format!("rejecting the delivery failed: {r}"),
                };
                Err(Error::new(
                    ErrorKind::Decode,
                    format!("{reason}; {outcome}"),
                ))
            }
        })
    }

    /// The untyped subscription back.
    pub fn into_inner(self) -> Subscription {
        self.inner
    }
}

/// The reject reason of a payload that does not decode as `T`: the
/// decode error, which names `T` and the payload's type.
fn undecodable<T: prost::Name>(e: &Error) -> String {
    let name = T::full_name();
    if e.message().contains(&name) {
        e.message().to_string()
    } else {
        format!("{} (expected {name})", e.message())
    }
}

impl<T: prost::Message + prost::Name + Default> Stream for TypedSubscription<T> {
    type Item = Result<TypedDelivery<T>>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let delivery = match self.inner.deliveries.poll_recv(cx) {
            Poll::Ready(Some(Ok(d))) => d,
            Poll::Ready(Some(Err(e))) => return Poll::Ready(Some(Err(e))),
            Poll::Ready(None) => return Poll::Ready(None),
            Poll::Pending => return Poll::Pending,
        };
        Poll::Ready(Some(match delivery.payload::<T>() {
            Ok(payload) => Ok(TypedDelivery { delivery, payload }),
            Err(e) => {
                let reason = undecodable::<T>(&e);
                delivery.reject_in_background(reason.clone());
                Err(Error::new(
                    ErrorKind::Decode,
                    format!("{reason}; rejecting the delivery"),
                ))
            }
        }))
    }
}

/// A [`Delivery`] with its payload decoded as `T`. Derefs to the
/// delivery, so settle it as one: `ack`, `nack`, `reject`, `extend`,
/// `handoff`, `handoff_to`.
#[derive(Clone)]
pub struct TypedDelivery<T> {
    delivery: Delivery,
    payload: T,
}

impl<T: std::fmt::Debug> std::fmt::Debug for TypedDelivery<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TypedDelivery")
            .field("delivery", &self.delivery)
            .field("payload", &self.payload)
            .finish()
    }
}

impl<T> TypedDelivery<T> {
    /// The decoded payload.
    pub fn payload(&self) -> &T {
        &self.payload
    }

    /// The delivery, without the payload.
    pub fn delivery(&self) -> &Delivery {
        &self.delivery
    }

    /// The delivery and its payload.
    pub fn into_parts(self) -> (Delivery, T) {
        (self.delivery, self.payload)
    }
}

impl<T> Deref for TypedDelivery<T> {
    type Target = Delivery;

    fn deref(&self) -> &Delivery {
        &self.delivery
    }
}
