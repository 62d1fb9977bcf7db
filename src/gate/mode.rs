//! `billing.mode`: the one place admission decides money.
//!
//! - `enforce`: [`Gate::reserve_enforced`], which refuses (402) what the
//!   key or its account cannot pay;
//! - `observe`: the same without lowering `max_tokens` (`cap`), and a
//!   refusal for money becomes a reservation of nothing that still settles
//!   the actual cost (and the day's fee) on the key and its account:
//!   metered, recorded, never refused or cut for money;
//! - `off`: a reservation of nothing that settles nothing: keys, rates and
//!   request caps still apply, no money moves.
//!
//! The other limits (disabled, expired, rpm, tpm, concurrency, models, IPs,
//! devices, a suspended account) refuse in every mode.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use http::StatusCode;

use super::{Bound, DAY_MS, Gate, LiveKey, Policy, Reservation, Reserved};
use crate::config::BillingMode;
use crate::error::ApiError;
use crate::money::Pico;

impl Gate {
    /// Sets the mode (at start, and on a config reload).
    pub fn set_billing_mode(&self, mode: BillingMode) {
        let v = match mode {
            BillingMode::Enforce => 0,
            BillingMode::Observe => 1,
            BillingMode::Off => 2,
        };
        self.billing_mode.store(v, Ordering::Release);
    }

    pub fn billing_mode(&self) -> BillingMode {
        match self.billing_mode.load(Ordering::Acquire) {
            1 => BillingMode::Observe,
            2 => BillingMode::Off,
            _ => BillingMode::Enforce,
        }
    }

    /// Step 4: holds the request's cost bound, as `billing.mode` says.
    pub fn reserve(
        &self,
        key: &Arc<LiveKey>,
        policy: &Policy,
        bound: &Bound,
    ) -> Result<Reserved, ApiError> {
        match self.billing_mode() {
            BillingMode::Enforce => self.reserve_enforced(key, policy, bound),
            BillingMode::Off => Ok(self.reserve_nothing(key, policy, false)?),
            // Never lowered either: what the client asked for goes upstream.
            BillingMode::Observe => match self.reserve_enforced(
                key,
                policy,
                &Bound {
                    cap: false,
                    ..*bound
                },
            ) {
                Err(e) if e.status == StatusCode::PAYMENT_REQUIRED => {
                    self.reserve_nothing(key, policy, true)
                }
                other => other,
            },
        }
    }

    /// A reservation of nothing. `metered`: it settles the actual cost on
    /// the key and its account (an overrun of a zero hold), and takes the
    /// day's fee if it is unpaid; else it settles nothing.
    fn reserve_nothing(
        &self,
        key: &Arc<LiveKey>,
        policy: &Policy,
        metered: bool,
    ) -> Result<Reserved, ApiError> {
        let now = self.clock.now_ms();
        let mut reservation = Reservation {
            key: key.clone(),
            amount: Pico::ZERO,
            daily_fee: None,
            fee_day_before: 0,
            tokens: 0,
            minute: 0,
            settled: false,
            account: None,
            unmetered: !metered,
        };
        if !metered {
            return Ok(Reserved {
                reservation,
                capped_max_tokens: None,
                daily_fee: None,
            });
        }
        key.roll_period(policy, now);
        let today = now.div_euclid(DAY_MS);
        if let Some(fee) = policy.record.daily_fee.filter(|f| f.0 > 0)
            && let Ok(before) = key
                .fee_day
                .fetch_update(Ordering::AcqRel, Ordering::Acquire, |d| {
                    (d < today).then_some(today)
                })
        {
            // Held like any fee: settle moves it to `period_spent`, a drop
            // gives it and the day back.
            key.committed.fetch_add(fee.0, Ordering::AcqRel);
            reservation.daily_fee = Some(fee);
            reservation.fee_day_before = before;
        }
        if let Some(owner) = policy.record.owner.as_deref()
            && let Some(account) = self.wallets.of(owner, now)?
        {
            account.check_status()?;
            reservation.account = Some(crate::billing::AccountHold {
                account,
                amount: 0,
                at_ms: now,
            });
        }
        let daily_fee = reservation.daily_fee;
        Ok(Reserved {
            reservation,
            capped_max_tokens: None,
            daily_fee,
        })
    }
}
