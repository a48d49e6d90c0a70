"""Online ADPO with people in the loop: score an unlabelled pair pool with the reference policy,
ask about the most informative pair next, keep every answer on disk before the next question."""
