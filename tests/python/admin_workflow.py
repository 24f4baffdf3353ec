"""The administrator's workflow through a client generated from Tally's
OpenAPI document (openapi-python-client), against a real `tally serve`.

Run by tests/tests/openapi.rs: python admin_workflow.py URL OPERATOR_TOKEN,
with the generated package `tally_client` on PYTHONPATH. Exits non-zero
(an assertion) on the first answer that is not what the API documents.
"""

import sys
from datetime import datetime, timezone

from tally_client import AuthenticatedClient
from tally_client.api.groups import groups_create, groups_get
from tally_client.api.keys import keys_create
from tally_client.api.orgs import orgs_create, orgs_events, orgs_get
from tally_client.api.usage import usage_authorize, usage_ingest
from tally_client.api.users import users_add, users_bulk, users_get, users_list, users_patch
from tally_client.models import (
    AddUser,
    AuthorizeRequest,
    Bulk,
    CreateGroup,
    CreateKey,
    CreateOrg,
    ErrorBody,
    IngestRequest,
    IngestRequestEventsItem,
    PatchUser,
)

USD = 1_000_000


def ok(response, status):
    """The parsed body of `response`, which must have `status`."""
    assert response.status_code == status, (response.status_code, response.content)
    return response.parsed


def main(url, token):
    client = AuthenticatedClient(base_url=url, token=token, raise_on_unexpected_status=True)

    # An org whose members get $50 a month unless told otherwise.
    org = ok(
        orgs_create.sync_detailed(
            client=client,
            body=CreateOrg(name="Acme", id="acme", default_monthly_limit_micros=50 * USD),
        ),
        201,
    )
    assert org.id == "acme" and org.default_monthly_limit_micros == 50 * USD, org

    # Five members, alice active; three of them in Engineering.
    for user in ["alice", "bob", "carol", "dave", "erin"]:
        added = ok(
            users_add.sync_detailed(
                "acme",
                client=client,
                body=AddUser(
                    id=user,
                    email=f"{user}@acme.example",
                    name=user.title(),
                    status="active" if user == "alice" else "invited",
                ),
            ),
            201,
        )
        assert added.monthly_limit_micros == 50 * USD, added
    ok(groups_create.sync_detailed("acme", client=client, body=CreateGroup(id="eng", name="Engineering")), 201)
    bulk = ok(
        users_bulk.sync_detailed(
            "acme", client=client, body=Bulk(user_ids=["alice", "bob", "carol"], add_groups=["eng"])
        ),
        200,
    )
    assert (bulk.users, bulk.users_changed) == (3, 3), bulk
    assert bulk.changes.to_dict() == {"member_added": 3}, bulk

    # A key for alice, allowed to chat.
    key = ok(
        keys_create.sync_detailed(
            "acme",
            client=client,
            body=CreateKey(id="alice-laptop", name="laptop", user_id="alice", features=["chat"]),
        ),
        201,
    )
    secret = key.secret
    assert secret.startswith("tly_sk_"), key

    # The gateway reports $45, asks, reports $6 more, asks again.
    def usage(request_id, cost):
        event = {
            "request_id": request_id,
            "org_id": "acme",
            "user_id": "alice",
            "api_key_id": "alice-laptop",
            "model": "gpt-4o",
            "provider": "openai",
            "cost_micros": cost,
            "occurred_at": datetime.now(timezone.utc).isoformat().replace("+00:00", "Z"),
        }
        body = IngestRequest(events=[IngestRequestEventsItem.from_dict(event)])
        return ok(usage_ingest.sync_detailed(client=client, body=body), 200)

    def authorize():
        return ok(usage_authorize.sync_detailed(client=client, body=AuthorizeRequest(api_key=secret, feature="chat")), 200)

    assert usage("req-1", 45 * USD).accepted == 1
    assert authorize().allowed is True
    assert usage("req-2", 6 * USD).accepted == 1
    assert usage("req-2", 6 * USD).duplicates == 1
    refused = authorize()
    assert refused.allowed is False and refused.reason == "user_monthly_limit", refused

    # The admin's view: members by spend, the group's total.
    top = ok(users_list.sync_detailed("acme", client=client, sort="-spend", limit=2), 200)
    assert [u.id for u in top.items][:1] == ["alice"], top
    assert top.items[0].spend_micros == 51 * USD and top.items[0].cut_off is True, top.items[0]
    eng = ok(groups_get.sync_detailed("acme", "eng", client=client), 200)
    assert (eng.member_count, eng.spend_micros) == (3, 51 * USD), eng
    assert sorted(m.id for m in eng.members) == ["alice", "bob", "carol"], eng.members

    # A higher limit lets alice through again; a bulk limit for two others.
    patched = ok(users_patch.sync_detailed("acme", "alice", client=client, body=PatchUser(monthly_limit_micros=100 * USD)), 200)
    assert patched.monthly_limit_micros == 100 * USD and patched.cut_off is False, patched
    allowed = authorize()
    assert allowed.allowed is True and allowed.remaining_micros == 49 * USD, allowed
    bulk = ok(
        users_bulk.sync_detailed("acme", client=client, body=Bulk(user_ids=["bob", "carol"], monthly_limit_micros=20 * USD)),
        200,
    )
    assert bulk.changes.to_dict() == {"user_limit_set": 2}, bulk

    # Every member once across pages of two.
    seen, cursor = [], None
    while True:
        kwargs = {"cursor": cursor} if cursor else {}
        page = ok(users_list.sync_detailed("acme", client=client, limit=2, **kwargs), 200)
        seen += [u.id for u in page.items]
        if not isinstance(page.next_cursor, str):
            break
        cursor = page.next_cursor
    assert sorted(seen) == ["alice", "bob", "carol", "dave", "erin"], seen

    # The audit trail, newest first: the bulk limit change on top.
    events = ok(orgs_events.sync_detailed("acme", client=client, order="newest", limit=3), 200)
    assert [e.to_dict()["type"] for e in events.items[:2]] == ["user_limit_set"] * 2, events
    org = ok(orgs_get.sync_detailed("acme", client=client), 200)
    assert org.spend_micros == 51 * USD, org

    # Errors parse as the documented body.
    missing = users_get.sync_detailed("acme", "ghost", client=client)
    assert missing.status_code == 404 and isinstance(missing.parsed, ErrorBody), missing
    assert missing.parsed.error.code == "not_found", missing.parsed
    print("admin workflow: ok")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
