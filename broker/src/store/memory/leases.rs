//! Leases on Memory.

use super::*;
use crate::store::Leases;

#[async_trait::async_trait]
impl Leases for Memory {
    async fn lease(&self, agent: &str, sequence: u64) -> Result<Option<(pb::Lease, u64)>> {
        self.trip("lease")?;
        Ok(self
            .state()?
            .leases
            .get(&format!("{agent}.{sequence}"))
            .cloned())
    }

    async fn put_lease(
        &self,
        agent: &str,
        sequence: u64,
        lease: &pb::Lease,
        revision: Option<u64>,
    ) -> Result<bool> {
        self.trip("put_lease")?;
        let mut s = self.state()?;
        let key = format!("{agent}.{sequence}");
        if s.leases.get(&key).map(|(_, r)| *r) != revision {
            return Ok(false);
        }
        let rev = s.next_revision();
        s.leases.insert(key, (lease.clone(), rev));
        Ok(true)
    }
}
