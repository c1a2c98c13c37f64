//! GCRA rate limits outside a user's slot (logins by client, by name),
//! and the refund of a place.

use fred::prelude::*;

use crate::{decision, scripts, Bucket, Decision, Policy, Result, Store};

impl Store {
    /// One GCRA step for `key` under `policy_name`.
    ///
    /// # Errors
    /// Redis is unreachable.
    pub async fn limit(&self, policy_name: &str, key: &str, policy: Policy) -> Result<Decision> {
        let (keys, args) = self.limit_call(policy_name, key, policy);
        let reply: Vec<i64> = self.run(scripts::limit(), keys, args).await?;
        let get = |i: usize| reply.get(i).copied().unwrap_or(0);
        Ok(decision(get(0) == 1, get(1), get(2), get(3)))
    }

    /// Gives back what one [`Store::limit`] step of `key` took.
    ///
    /// # Errors
    /// Redis is unreachable.
    pub async fn refund(&self, policy_name: &str, key: &str, policy: Policy) -> Result<()> {
        let (keys, args) = self.limit_call(policy_name, key, policy);
        let _: i64 = self.run(scripts::refund(), keys, args).await?;
        Ok(())
    }

    /// The key and arguments of an anonymous limit's scripts.
    fn limit_call(
        &self,
        policy_name: &str,
        key: &str,
        policy: Policy,
    ) -> (Vec<String>, Vec<Value>) {
        (
            vec![self.bucket_key(
                policy_name,
                &Bucket::Plain {
                    name: key.to_owned(),
                },
                None,
            )],
            vec![
                (policy.limit as i64).into(),
                (policy.window.as_millis() as i64).into(),
            ],
        )
    }
}
