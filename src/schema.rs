// @generated automatically by Diesel CLI.

diesel::table! {
    accounts (id) {
        id -> Int8,
        name -> Text,
        balance -> Int8,
        created_at -> Timestamptz,
    }
}

diesel::table! {
    idempotency_keys (endpoint, key) {
        endpoint -> Text,
        key -> Text,
        fingerprint -> Text,
        response_status -> Int2,
        response_body -> Text,
        created_at -> Timestamptz,
    }
}

diesel::table! {
    transfers (id) {
        id -> Int8,
        from_account_id -> Int8,
        to_account_id -> Int8,
        amount -> Int8,
        created_at -> Timestamptz,
    }
}

diesel::allow_tables_to_appear_in_same_query!(accounts, idempotency_keys, transfers,);
