-- Seeded mapping of the rental pipeline's Kommo statuses to bookings.status (see docs/status-mapping.md).
-- Statuses 79790631, 91703923 and 143 never become bookings; they are mapped for completeness.
INSERT INTO kommo_status_map (status_id, booking_status, label) VALUES
    (79790631, 'inquiry',     'Request bot answering (no booking)'),
    (91703923, 'follow_up',   'Follow up (no booking)'),
    (79790634, 'pending',     'Quote sent'),
    (79790637, 'confirmed',   'Confirmed'),
    (79790640, 'in_progress', 'Car delivered'),
    (142,      'completed',   'Closed - won'),
    (143,      'cancelled',   'Closed - lost (no booking)')
ON CONFLICT (status_id) DO NOTHING;
