"""What the operator and the customers use besides the API: the admin API (`admin`),
the `flask` commands (`cli`), the dashboard and its sessions (`dashboard`,
`dashboard_invites`, `sessions`), the account page (`account`), self-service sign-up
(`signup`, `invites`, `mail`) and what those HTML pages share (`pages`).
"""
