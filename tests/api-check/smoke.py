"""Smoke test of the client that openapi-python-client generated from /openapi.json
(scripts/api-check.sh): two accounts, a transfer between them, everything read back."""

import sys
import uuid

from client import Client
from client.api.default import create_account, create_transfer, get_account, get_transfer
from client.models import Account, CreateAccount, Transfer, TransferRequest


def main(base_url: str) -> None:
    api = Client(base_url=base_url, raise_on_unexpected_status=True)
    suffix = uuid.uuid4().hex[:8]
    alice = create_account.sync(client=api, body=CreateAccount(name=f"alice {suffix}", balance=1000))
    bob = create_account.sync(client=api, body=CreateAccount(name=f"bob {suffix}"))
    assert isinstance(alice, Account) and isinstance(bob, Account), (alice, bob)
    assert (alice.name, alice.balance, bob.balance) == (f"alice {suffix}", 1000, 0)

    answer = create_transfer.sync_detailed(
        client=api,
        body=TransferRequest(from_account_id=alice.id, to_account_id=bob.id, amount=250),
        idempotency_key=f"smoke-{suffix}",
    )
    transfer = answer.parsed
    assert answer.status_code == 201 and isinstance(transfer, Transfer), answer
    assert answer.headers["location"] == f"/transfers/{transfer.id}"

    read = get_transfer.sync(client=api, id=transfer.id)
    assert isinstance(read, Transfer), read
    assert (read.from_account_id, read.to_account_id, read.amount) == (alice.id, bob.id, 250)
    balances = [get_account.sync(client=api, id=a.id).balance for a in (alice, bob)]
    assert balances == [750, 250], balances
    print("smoke: two accounts, one transfer, read back through the generated client")


if __name__ == "__main__":
    main(sys.argv[1])
